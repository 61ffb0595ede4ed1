-- The seed's entities in ClickHouse. Writes are idempotent (ReplacingMergeTree keyed by the
-- entity's identity, with a version where a row is rewritten), so a worker that replays
-- after a crash rewrites the same rows instead of adding to them.
-- {on_cluster} and {replicated} are filled in from METERING_CLICKHOUSE_CLUSTER (empty without one).

-- One row per accepted, de-duplicated usage record (the seed's UsageRecord).
CREATE TABLE IF NOT EXISTS usage_records {on_cluster}
(
    subject_type LowCardinality(String),
    subject_id String,
    metric_key LowCardinality(String),
    id String COMMENT 'record id, or @topic/partition/offset[/index] for records sent without one',
    timestamp DateTime64(3, 'UTC'),
    quantity Decimal(38, 18),
    metadata String COMMENT 'JSON text',
    metric_id String,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = {replicated}ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (subject_type, subject_id, metric_key, timestamp, id);

-- Rollup state per (metric, subject, period), rewritten with a higher version as it changes.
CREATE TABLE IF NOT EXISTS usage_rollups {on_cluster}
(
    metric_key LowCardinality(String),
    subject_type LowCardinality(String),
    subject_id String,
    period_type LowCardinality(String),
    period_start DateTime('UTC'),
    period_end DateTime('UTC'),
    aggregation_type LowCardinality(String),
    total_quantity Decimal(76, 18),
    record_count UInt64,
    sum_quantity Decimal(76, 18),
    min_quantity Decimal(38, 18),
    max_quantity Decimal(38, 18),
    version UInt64,
    updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = {replicated}ReplacingMergeTree(version)
PARTITION BY toYYYYMM(period_start)
ORDER BY (metric_key, subject_type, subject_id, period_type, period_start);

-- The seed's UsageSummary: exactly one row per (metric, subject, period type, period start).
CREATE VIEW IF NOT EXISTS usage_summary {on_cluster} AS
SELECT
    metric_key,
    subject_type,
    subject_id,
    period_type,
    period_start,
    period_end,
    total_quantity,
    record_count
FROM usage_rollups FINAL;

-- Mirror of the metering.metrics topic (the topic is the source of truth).
CREATE TABLE IF NOT EXISTS metric_definitions {on_cluster}
(
    id String,
    key String,
    name String,
    description String,
    unit String,
    aggregation_type LowCardinality(String),
    reset_period LowCardinality(String),
    org_id Nullable(String),
    deleted UInt8 DEFAULT 0,
    version UInt64
)
ENGINE = {replicated}ReplacingMergeTree(version)
ORDER BY id;

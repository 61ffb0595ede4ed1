-- Threshold alerts (the seed's threshold.approaching / threshold.exceeded events) for reporting.
-- Keyed by the alert's deterministic id: a replayed alert rewrites the same row.
CREATE TABLE IF NOT EXISTS threshold_events {on_cluster}
(
    id String,
    type LowCardinality(String),
    threshold_id String,
    metric_key LowCardinality(String),
    subject_type LowCardinality(String),
    subject_id String,
    threshold Decimal(38, 18),
    value Decimal(76, 18),
    period_type LowCardinality(String),
    period_start DateTime('UTC'),
    period_end DateTime('UTC'),
    action LowCardinality(String),
    notify_emails Array(String),
    occurred_at DateTime64(3, 'UTC')
)
ENGINE = {replicated}ReplacingMergeTree
PARTITION BY toYYYYMM(period_start)
ORDER BY id;

-- E-mail notifications of alerts: one row per (alert, address), the latest attempt winning.
CREATE TABLE IF NOT EXISTS notification_deliveries {on_cluster}
(
    alert_id String,
    email String,
    status LowCardinality(String) COMMENT 'sent or failed',
    attempts UInt32,
    error String,
    updated_at DateTime64(3, 'UTC')
)
ENGINE = {replicated}ReplacingMergeTree(updated_at)
ORDER BY (alert_id, email);

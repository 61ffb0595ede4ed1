-- Billing: mirrors of the metering.plans and metering.subscriptions topics (the topics are the
-- source of truth), and invoices stored when their period is FINAL so they read the same later.

CREATE TABLE IF NOT EXISTS plans {on_cluster}
(
    key String,
    name String,
    currency LowCardinality(String),
    billing_period LowCardinality(String),
    flat_fee Nullable(Decimal(38, 18)),
    prices String COMMENT 'JSON array of the plan''s prices, as on the topic',
    org_id Nullable(String),
    deleted UInt8 DEFAULT 0,
    version UInt64 COMMENT 'offset on metering.plans'
)
ENGINE = {replicated}ReplacingMergeTree(version)
ORDER BY key;

CREATE TABLE IF NOT EXISTS subscriptions {on_cluster}
(
    id String,
    subject_type LowCardinality(String),
    subject_id String,
    plan_key String,
    start_at DateTime64(3, 'UTC'),
    end_at Nullable(DateTime64(3, 'UTC')),
    org_id Nullable(String),
    deleted UInt8 DEFAULT 0,
    version UInt64 COMMENT 'offset on metering.subscriptions'
)
ENGINE = {replicated}ReplacingMergeTree(version)
ORDER BY id;

-- The first stored computation of a FINAL invoice wins (argMin over computed_at when reading).
CREATE TABLE IF NOT EXISTS invoices {on_cluster}
(
    subject_type LowCardinality(String),
    subject_id String,
    period String,
    currency Nullable(String),
    subtotal Decimal(76, 18),
    body String COMMENT 'the Invoice as JSON',
    computed_at DateTime64(3, 'UTC')
)
ENGINE = {replicated}MergeTree
ORDER BY (subject_type, subject_id, period, computed_at);

-- Webhook deliveries: one row per attempt to POST one event to one endpoint (a re-run of the same attempt after a
-- crash replaces its row). The payload is kept so that a delivery can be resent as it was first sent.
CREATE TABLE IF NOT EXISTS webhook_deliveries {on_cluster}
(
    endpoint_id String,
    delivery_id String COMMENT 'the webhook-id header: one per event, the same on every attempt',
    event_id String,
    event_type LowCardinality(String),
    attempt UInt32,
    status LowCardinality(String) COMMENT 'delivered, retrying or failed',
    status_code Nullable(UInt16),
    latency_ms UInt32,
    error String,
    attempted_at DateTime64(3, 'UTC'),
    next_attempt_at Nullable(DateTime64(3, 'UTC')),
    payload String CODEC(ZSTD)
)
ENGINE = {replicated}ReplacingMergeTree(attempted_at)
ORDER BY (endpoint_id, delivery_id, attempt);

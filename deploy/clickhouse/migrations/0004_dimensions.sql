-- Meters that read the payload (groupBy, valueProperty, filter, UNIQUE_COUNT, LATEST).
-- usage_rollups holds, besides each (metric, subject, period)'s total row (dimensions = {}), one row per
-- combination of a grouped metric's dimension values: the map joins the rollup's identity (its sorting key).
ALTER TABLE usage_rollups {on_cluster}
    ADD COLUMN IF NOT EXISTS dimensions Map(String, String),
    MODIFY ORDER BY (metric_key, subject_type, subject_id, period_type, period_start, dimensions);

CREATE OR REPLACE VIEW usage_summary {on_cluster} AS
SELECT
    metric_key,
    subject_type,
    subject_id,
    period_type,
    period_start,
    period_end,
    total_quantity,
    record_count,
    dimensions
FROM usage_rollups FINAL;

-- What the worker read from each record when it counted it: its dimension values (grouped metrics) and, for a
-- UNIQUE_COUNT metric, the string form of the value at valueProperty. Invoices over part of a period or a subset of
-- dimensions count distinct values (and LATEST values) from these, never by adding up rows.
ALTER TABLE usage_records {on_cluster}
    ADD COLUMN IF NOT EXISTS dimensions Map(String, String),
    ADD COLUMN IF NOT EXISTS distinct_value String COMMENT 'UNIQUE_COUNT metrics: the value at valueProperty as a string';

ALTER TABLE threshold_events {on_cluster}
    ADD COLUMN IF NOT EXISTS dimensions Map(String, String) COMMENT 'the dimension row the threshold watched; {}: the total';

ALTER TABLE metric_definitions {on_cluster}
    ADD COLUMN IF NOT EXISTS value_property Nullable(String),
    ADD COLUMN IF NOT EXISTS group_by String DEFAULT '{}' COMMENT 'JSON object: dimension -> metadata path',
    ADD COLUMN IF NOT EXISTS filter String DEFAULT '{}' COMMENT 'JSON object: path -> accepted values';

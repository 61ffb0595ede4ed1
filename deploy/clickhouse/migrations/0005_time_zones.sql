-- Subjects' time zones (issue 28). A subject with a zone of its own has its hourly, daily and monthly rows twice: cut
-- in UTC (time_zone 'UTC', what every row was before) and in its zone, period_start being the UTC instant at which
-- the local period starts. The zone joins the rows' identity: a local day and a UTC day may start at the same
-- instant (a zone at +00:00 in winter) and must not replace each other.
-- A column joins the sorting key only without a default; the default follows, and rows written before read it.
ALTER TABLE usage_rollups {on_cluster}
    ADD COLUMN IF NOT EXISTS time_zone LowCardinality(String) COMMENT 'IANA zone the periods were cut in',
    MODIFY ORDER BY (metric_key, subject_type, subject_id, period_type, period_start, dimensions, time_zone);

ALTER TABLE usage_rollups {on_cluster}
    MODIFY COLUMN time_zone LowCardinality(String) DEFAULT 'UTC' COMMENT 'IANA zone the periods were cut in';

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
    dimensions,
    time_zone
FROM usage_rollups FINAL;

ALTER TABLE threshold_events {on_cluster}
    ADD COLUMN IF NOT EXISTS time_zone LowCardinality(String) DEFAULT 'UTC' COMMENT 'IANA zone the window was cut in';

"""`metering bench`: throughput, alert latency, freshness and memory of the pipeline, measured side by side."""

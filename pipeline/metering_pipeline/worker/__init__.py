"""The stream worker: route usage by subject, roll it up exactly once, sink it to ClickHouse."""

"""Development tooling for usage-metering, kept out of the product distribution.

The local stack (Apache Kafka from Maven Central, the tansu broker, certificates) and ClickHouse's HTTP interface over
the embedded engine (`clickhouse_endpoint`), the benchmark (`bench`) and the demo. Installed from the checkout by
`deploy/bootstrap.sh`; its commands join `metering` through the `metering.commands` entry points.
"""

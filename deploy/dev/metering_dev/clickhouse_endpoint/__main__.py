"""`python -m metering_dev.clickhouse_endpoint --port 8123 --data-dir DIR`: see `server.main`."""

from metering_dev.clickhouse_endpoint.server import main

if __name__ == "__main__":
    main()

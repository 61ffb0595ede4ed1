"""Invoicing: billing's pure rules applied to the usage ClickHouse holds, once Kafka says a period is settled.

It depends on `billing` (what a price bills and what it costs) and on `warehouse` (the reads), and neither
imports it, so the two stay independent: `preview` answers the API and the CLI, `quantities` measures the usage
each price bills, `settlement` asks the consumer groups whether a closed period can still change.
"""

"""The metering domain's pure logic: periods, aggregation, record intake, dedup, metric resolution.

Nothing here does I/O, so every rule is unit-tested without a broker or a warehouse.
"""

"""Billing: plans and prices turned into invoice previews from the same rollups reporting uses.

`pricing`, `invoice` and `selection` (which usage a price bills, and from which source) are pure;
`warehouse.invoices` reads the billed quantities from ClickHouse and `settlement` asks Kafka whether
the pipeline has processed everything that can still land in a period.
"""

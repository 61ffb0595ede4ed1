"""Billing's rules, pure (no I/O) so they are tested without a broker or ClickHouse: `pricing` (pricing models,
rounding), `invoice` (segments, proration, status) and `selection` (which usage a price bills, and how it is
measured). `invoicing` applies them to the usage ClickHouse holds.
"""

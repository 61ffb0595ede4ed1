"""ClickHouse: the client the product uses, and the schema migrations it applies."""

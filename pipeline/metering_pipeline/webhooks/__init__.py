"""Webhooks: events POSTed to users' HTTP endpoints, signed to the Standard Webhooks scheme, retried and logged."""

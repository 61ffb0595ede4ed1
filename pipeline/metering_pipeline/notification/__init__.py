"""E-mail notifications of threshold alerts: message building, SMTP delivery, the notifier loop."""

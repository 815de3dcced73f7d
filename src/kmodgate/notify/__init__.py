"""Notifications: events (regressions, fixes, gate decisions changing), an
outbox that delivers each exactly once per recipient, email and webhooks."""

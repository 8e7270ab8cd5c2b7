"""Monitoring: read-only views of the ledger, the dashboard and its JSON API, and the
Prometheus metrics. Nothing here writes state except through the ledger's verbs."""

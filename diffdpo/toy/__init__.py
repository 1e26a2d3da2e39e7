"""Embedded worlds for CPU demos and tests (no downloads)."""

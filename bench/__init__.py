"""Benchmarks and experiments: scripts run from the repository root (see README.md)."""

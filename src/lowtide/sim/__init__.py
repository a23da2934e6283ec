"""Test and benchmark helpers that stand in for external services."""

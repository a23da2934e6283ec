"""Lowtide: a self-hosted Batch API for LLM inference."""

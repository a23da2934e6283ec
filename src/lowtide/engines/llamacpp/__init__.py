"""The embedded chat engine: llama.cpp decoding many requests together."""

from lowtide.engines.llamacpp.adapter import LlamaCppEngine

__all__ = ["LlamaCppEngine"]

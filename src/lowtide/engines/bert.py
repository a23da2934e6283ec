"""A BERT sentence encoder (all-MiniLM-L6-v2) in plain numpy.

Why numpy: the model is 22M parameters, and its forward pass is a dozen matrix products per
layer, which numpy hands to BLAS. That needs no torch (about 1 GB) and no ONNX export step;
the weights load straight from the sentence-transformers folder (`model.safetensors`) and the
tokenizer from its `tokenizer.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _erf(x: np.ndarray) -> np.ndarray:
    """erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), enough for BERT's exact GELU."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = (
        (((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592
    ) * t
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x * np.float32(0.7071067811865476)))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    return centered / np.sqrt(var + eps) * weight + bias


class _Layer:
    def __init__(self, w: dict[str, np.ndarray], prefix: str) -> None:
        def g(name: str) -> np.ndarray:
            return np.ascontiguousarray(w[f"{prefix}.{name}"], dtype=np.float32)

        # One fused QKV projection: a single BLAS call instead of three.
        self.qkv_w = np.ascontiguousarray(
            np.concatenate(
                [
                    g("attention.self.query.weight"),
                    g("attention.self.key.weight"),
                    g("attention.self.value.weight"),
                ]
            ).T
        )
        self.qkv_b = np.concatenate(
            [
                g("attention.self.query.bias"),
                g("attention.self.key.bias"),
                g("attention.self.value.bias"),
            ]
        )
        self.attn_out_w = np.ascontiguousarray(g("attention.output.dense.weight").T)
        self.attn_out_b = g("attention.output.dense.bias")
        self.ln1_w, self.ln1_b = (
            g("attention.output.LayerNorm.weight"),
            g("attention.output.LayerNorm.bias"),
        )
        self.ff_in_w = np.ascontiguousarray(g("intermediate.dense.weight").T)
        self.ff_in_b = g("intermediate.dense.bias")
        self.ff_out_w = np.ascontiguousarray(g("output.dense.weight").T)
        self.ff_out_b = g("output.dense.bias")
        self.ln2_w, self.ln2_b = g("output.LayerNorm.weight"), g("output.LayerNorm.bias")


def load_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    """The model's tokenizer as the encoder uses it (truncated to max_seq_length, no padding):
    estimates count with it without loading the weights."""
    from tokenizers import Tokenizer

    st_config_path = folder / "sentence_bert_config.json"
    st_config = json.loads(st_config_path.read_text()) if st_config_path.exists() else {}
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=int(st_config.get("max_seq_length", 512)))
    tokenizer.no_padding()
    return tokenizer


class BertSentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings, as sentence-transformers computes them."""

    concurrent = False  # numpy's BLAS threads take every core already: one call at a time

    def __init__(self, folder: Path) -> None:
        from safetensors.numpy import load_file

        config = json.loads((folder / "config.json").read_text())
        self.tokenizer = load_tokenizer(folder)
        self.max_tokens = self.tokenizer.truncation["max_length"]
        self.heads = int(config["num_attention_heads"])
        self.dim = int(config["hidden_size"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        weights = load_file(str(folder / "model.safetensors"))
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""
        emb = f"{prefix}embeddings"
        self.word = weights[f"{emb}.word_embeddings.weight"].astype(np.float32)
        self.position = weights[f"{emb}.position_embeddings.weight"].astype(np.float32)
        self.token_type = weights[f"{emb}.token_type_embeddings.weight"][0].astype(np.float32)
        self.emb_ln_w = weights[f"{emb}.LayerNorm.weight"].astype(np.float32)
        self.emb_ln_b = weights[f"{emb}.LayerNorm.bias"].astype(np.float32)
        self.layers = [
            _Layer(weights, f"{prefix}encoder.layer.{i}")
            for i in range(int(config["num_hidden_layers"]))
        ]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(texts)]

    def encode_ids(self, batch: list[list[int]]) -> np.ndarray:
        """Embeddings for token-id sequences of similar length (the caller sorts by length)."""
        n, length = len(batch), max(len(ids) for ids in batch)
        ids = np.zeros((n, length), dtype=np.int64)
        mask = np.zeros((n, length), dtype=np.float32)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1.0
        x = self.word[ids] + self.position[:length] + self.token_type
        x = _layer_norm(x, self.emb_ln_w, self.emb_ln_b, self.eps)
        heads, head_dim = self.heads, self.dim // self.heads
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        scale = np.float32(1.0 / np.sqrt(head_dim))
        for layer in self.layers:
            qkv = x @ layer.qkv_w + layer.qkv_b
            qkv = qkv.reshape(n, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(n, length, self.dim)
            x = _layer_norm(
                x + context @ layer.attn_out_w + layer.attn_out_b,
                layer.ln1_w,
                layer.ln1_b,
                self.eps,
            )
            hidden = _gelu(x @ layer.ff_in_w + layer.ff_in_b)
            x = _layer_norm(
                x + hidden @ layer.ff_out_w + layer.ff_out_b, layer.ln2_w, layer.ln2_b, self.eps
            )
        pooled = (x * mask[:, :, None]).sum(axis=1) / np.maximum(
            mask.sum(axis=1, keepdims=True), 1e-9
        )
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)

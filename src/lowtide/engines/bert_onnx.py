"""all-MiniLM-L6-v2 on ONNX Runtime: the graph built from the safetensors weights, once.

No PyPI package ships MiniLM as ONNX, and exporting it takes torch (about 1 GB). The model is
small and regular, so the graph is written here directly with the `onnx` package, from the same
`model.safetensors` and `config.json` the numpy encoder (`bert.py`) reads. It is the graph an
export of the sentence-transformers model gives (Gather, MatMul, Softmax, Erf,
LayerNormalization; mean pooling over the real tokens and L2 normalisation in the graph), which
ONNX Runtime's graph optimizer fuses into its transformer kernels.

Two graphs, the same vectors: `q8=False` is the plain float32 export; with `q8=True` the
attention-output and feed-forward products — two thirds of the multiply-adds — run as ONNX
Runtime's `MatMulNBits` on weights quantized to 8 bits by blocks of 16 (a scale per block), its
activations quantized by blocks too (int8 dot products); the Q/K/V projections, whose error the
attention scores amplify, stay float32. Against the float32 model that keeps every vector's
cosine above 0.9995 (the tests check >= 0.999). Which one is faster depends on the CPU: with
int8 dot-product instructions (VNNI) the 8-bit graph gained 10-20%; on AVX2 alone (AMD Zen 3)
ONNX Runtime's 8-bit kernel is ~1.6x slower than float32. So by default (`q8=None`) both are
timed once on this machine and the faster one is kept, the choice cached beside the graphs.

The built graph (~91 MB) is written once to the cache folder, named after a digest of the
weights file, the config and the builder version, so a changed model or builder builds anew; a
load without a cache folder builds it in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from lowtide.engines.bert import load_tokenizer

log = logging.getLogger("lowtide.embeddings")

BUILDER_VERSION = 1  # bump when the graph changes: cached files of an older builder are rebuilt
OPSET = 17  # LayerNormalization is standard from 17 (the plain graph uses it)
# Smaller blocks, smaller error: every cosine >= 0.9995 against float32, where 32 gives 0.999.
Q8_BLOCK = 16


def _weights(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    raw = load_file(str(folder / "model.safetensors"))
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in raw else ""
    weights = {
        k[len(prefix) :]: np.ascontiguousarray(v, dtype=np.float32)
        for k, v in raw.items()
        if k.startswith(prefix) and v.dtype != np.int64
    }
    return config, weights


def build_graph(folder: Path, q8: bool = True) -> Any:
    """The ONNX model (an `onnx.ModelProto`) of the sentence encoder in `folder`.

    Inputs `input_ids` and `attention_mask` (int32, batch x length, padding on the right);
    output `embeddings` (float32, batch x hidden), mean-pooled over the mask and L2-normalised.
    `q8=False` is the graph an export gives, float32 throughout.
    """
    from onnx import TensorProto, helper, numpy_helper

    config, w = _weights(folder)
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    layers = int(config["num_hidden_layers"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    head_dim = hidden // heads

    nodes: list[Any] = []
    inits: list[Any] = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], name: str, domain: str = "", **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, domain=domain, **attrs))
        return name

    def matmul(x: str, weight: np.ndarray, bias: np.ndarray, name: str, quantize: bool) -> str:
        """x @ weight + bias; with `quantize`, ONNX Runtime's MatMulNBits on 8-bit weights."""
        if not quantize or weight.shape[0] % Q8_BLOCK:
            mm = node("MatMul", [x, init(f"{name}_w", weight)], f"{name}_mm")
            return node("Add", [mm, init(f"{name}_b", bias)], name)
        k, n = weight.shape
        blocks = weight.T.reshape(n, k // Q8_BLOCK, Q8_BLOCK)
        scale = np.abs(blocks).max(axis=2) / 127.0
        scale[scale == 0] = 1.0
        quant = np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128  # zero point 128
        mm = node(
            "MatMulNBits",
            [
                x,
                init(f"{name}_q8", quant.astype(np.uint8)),
                init(f"{name}_scale", scale.astype(np.float32).reshape(-1)),
            ],
            f"{name}_mm",
            "com.microsoft",
            K=k,
            N=n,
            bits=8,
            block_size=Q8_BLOCK,
            accuracy_level=4,  # the activations quantized by blocks too: int8 dot products
        )
        return node("Add", [mm, init(f"{name}_b", bias)], name)

    def split_heads(x: str, name: str, weight: np.ndarray, bias: np.ndarray) -> str:
        """x @ weight + bias as (batch, heads, length, head_dim); float32 (attention scores
        are where quantization error grows)."""
        projected = matmul(x, weight, bias, name, quantize=False)
        split = node("Reshape", [projected, "heads_shape"], f"{name}_heads")
        return node("Transpose", [split], f"{name}_t", perm=[0, 2, 1, 3])

    def layer_norm(x: str, weight: np.ndarray, bias: np.ndarray, name: str) -> str:
        scale_b = [init(f"{name}_w", weight), init(f"{name}_b", bias)]
        return node("LayerNormalization", [x, *scale_b], name, axis=-1, epsilon=eps)

    # Constants.
    init("zero", np.array([0], dtype=np.int64))
    init("axis0", np.array([0], dtype=np.int64))
    init("one", np.array(1.0, dtype=np.float32))
    init("neg", np.array(-10000.0, dtype=np.float32))
    init("mask_axes", np.array([1, 2], dtype=np.int64))
    init("heads_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    init("merge_shape", np.array([0, 0, hidden], dtype=np.int64))
    init("scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))
    init("sqrt_half", np.array(1.0 / np.sqrt(2.0), dtype=np.float32))
    init("half", np.array(0.5, dtype=np.float32))

    # Embeddings. Every token is type 0: that row is folded into the position table.
    token_type0 = w["embeddings.token_type_embeddings.weight"][0]
    init("word_emb", w["embeddings.word_embeddings.weight"])
    init("pos_emb", w["embeddings.position_embeddings.weight"] + token_type0)
    words = node("Gather", ["word_emb", "input_ids"], "words")
    length = node("Shape", ["input_ids"], "length", start=1, end=2)
    positions = node("Slice", ["pos_emb", "zero", length, "axis0"], "positions")
    summed = node("Add", [words, positions], "emb_sum")
    x = layer_norm(summed, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], "emb")
    # Additive attention bias: 0 on real tokens, -10000 on padding (as BERT exports do).
    mask_f = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    inv = node("Sub", ["one", mask_f], "mask_inv")
    attn_bias = node("Mul", [node("Unsqueeze", [inv, "mask_axes"], "mask_inv4"), "neg"], "bias")

    for i in range(layers):
        p = f"encoder.layer.{i}"

        def g(name: str, prefix: str = p) -> np.ndarray:
            return w[f"{prefix}.{name}"]

        q = split_heads(
            x, f"l{i}.q", g("attention.self.query.weight").T, g("attention.self.query.bias")
        )
        k = split_heads(
            x, f"l{i}.k", g("attention.self.key.weight").T, g("attention.self.key.bias")
        )
        v = split_heads(
            x, f"l{i}.v", g("attention.self.value.weight").T, g("attention.self.value.bias")
        )
        k_t = node("Transpose", [k], f"l{i}.k_tt", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [q, k_t], f"l{i}.qk"), "scale"], f"l{i}.scores")
        probs = node(
            "Softmax", [node("Add", [scores, attn_bias], f"l{i}.masked")], f"l{i}.probs", axis=-1
        )
        ctx4 = node("MatMul", [probs, v], f"l{i}.ctx4")
        ctx_t = node("Transpose", [ctx4], f"l{i}.ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx_t, "merge_shape"], f"l{i}.ctx")
        proj = matmul(
            ctx,
            g("attention.output.dense.weight").T,
            g("attention.output.dense.bias"),
            f"l{i}.proj",
            q8,
        )
        x = layer_norm(
            node("Add", [proj, x], f"l{i}.res1"),
            g("attention.output.LayerNorm.weight"),
            g("attention.output.LayerNorm.bias"),
            f"l{i}.ln1",
        )
        up = matmul(
            x, g("intermediate.dense.weight").T, g("intermediate.dense.bias"), f"l{i}.up", q8
        )
        # Exact GELU: 0.5 * up * (1 + erf(up / sqrt 2)).
        erf = node("Erf", [node("Mul", [up, "sqrt_half"], f"l{i}.up_s")], f"l{i}.erf")
        erf1 = node("Add", [erf, "one"], f"l{i}.erf1")
        act = node("Mul", [node("Mul", [up, erf1], f"l{i}.gelu_m"), "half"], f"l{i}.gelu")
        down = matmul(act, g("output.dense.weight").T, g("output.dense.bias"), f"l{i}.down", q8)
        x = layer_norm(
            node("Add", [down, x], f"l{i}.res2"),
            g("output.LayerNorm.weight"),
            g("output.LayerNorm.bias"),
            f"l{i}.ln2",
        )

    # Mean over the real tokens, then unit length.
    init("last_axis", np.array([-1], dtype=np.int64))
    init("seq_axis", np.array([1], dtype=np.int64))
    init("tiny_count", np.array(1e-9, dtype=np.float32))
    init("tiny_norm", np.array(1e-12, dtype=np.float32))
    mask3 = node("Unsqueeze", [mask_f, "last_axis"], "mask3")
    masked_x = node("Mul", [x, mask3], "masked_x")
    pooled_sum = node("ReduceSum", [masked_x, "seq_axis"], "pool_sum", keepdims=0)
    count = node("ReduceSum", [mask_f, "seq_axis"], "pool_count", keepdims=1)
    pooled = node("Div", [pooled_sum, node("Max", [count, "tiny_count"], "pool_den")], "pooled")
    norm = node("ReduceL2", [pooled], "norm", axes=[-1], keepdims=1)
    node("Div", [pooled, node("Max", [norm, "tiny_norm"], "norm_den")], "embeddings")

    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2" + ("-q8" if q8 else ""),
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "length"]),
        ],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", hidden])],
        inits,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lowtide")
    model.ir_version = 8
    return model


def _digest(folder: Path, q8: bool) -> str:
    """Names the built graph after what it is built from: the builder, the config, the weights
    file (its size and modification time: hashing 91 MB would cost more than the check saves)."""
    weights = (folder / "model.safetensors").stat()
    h = hashlib.sha256(f"v{BUILDER_VERSION}-{'q8' if q8 else 'f32'}".encode())
    h.update((folder / "config.json").read_bytes())
    h.update(f"{folder.resolve()}:{weights.st_size}:{weights.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prepare_graph(folder: Path, cache_dir: Path | None, q8: bool = True) -> bytes | Path:
    """The serialized graph: a cached file when there is a cache folder (built there once),
    else the bytes built in memory."""
    started = time.monotonic()
    if cache_dir is None:
        return build_graph(folder, q8).SerializeToString()
    name = folder.parent.name if folder.name == "model" else folder.name
    target = cache_dir / f"{name}.{'q8' if q8 else 'f32'}.{_digest(folder, q8)}.onnx"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(build_graph(folder, q8).SerializeToString())
    os.replace(tmp, target)
    log.info(
        "built the ONNX graph of %s in %.1fs -> %s", folder, time.monotonic() - started, target
    )
    return target


def _session(graph: bytes | Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads would take the core the event loop needs between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    source = str(graph) if isinstance(graph, Path) else graph
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def _faster_graph(folder: Path, cache_dir: Path | None, threads: int) -> tuple[bool, Any]:
    """Whether the 8-bit graph encodes faster than float32 here, and the session that timed it
    (None when the choice was remembered): timed once on a batch of 64 short texts (best of 3,
    interleaved), remembered in the cache folder for this CPU model and ONNX Runtime version.
    The 8-bit graph must win by 5% to be chosen: float32 is exact."""
    import onnxruntime as ort

    key = hashlib.sha256(
        f"{_digest(folder, True)}{_digest(folder, False)}{_cpu_model()}{ort.__version__}{threads}".encode()
    ).hexdigest()[:16]
    remembered = cache_dir / f"choice.{key}.json" if cache_dir is not None else None
    if remembered is not None and remembered.exists():
        try:
            return bool(json.loads(remembered.read_text())["q8"]), None
        except (OSError, ValueError, KeyError):
            pass  # unreadable: measure again
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(64, 16), dtype=np.int32)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    sessions = {q8: _session(prepare_graph(folder, cache_dir, q8), threads) for q8 in (True, False)}
    best = {q8: float("inf") for q8 in sessions}
    for round_ in range(4):
        for q8, session in sessions.items():
            started = time.perf_counter()
            session.run(["embeddings"], feed)
            if round_:  # the first round warms up
                best[q8] = min(best[q8], time.perf_counter() - started)
    choice = best[True] < 0.95 * best[False]
    log.info(
        "embeddings: 8-bit graph %.1f ms, float32 %.1f ms a batch of 64 on %s: using %s",
        best[True] * 1000,
        best[False] * 1000,
        _cpu_model(),
        "8-bit" if choice else "float32",
    )
    if remembered is not None:
        tmp = remembered.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"q8": choice, "ms": {"q8": best[True], "f32": best[False]}}))
        os.replace(tmp, remembered)
    return choice, sessions[choice]


class OnnxSentenceEncoder:
    """The same interface and vectors as `bert.BertSentenceEncoder`, on ONNX Runtime."""

    concurrent = True  # encode_ids may run on several threads at once (one session, thread-safe)

    def __init__(
        self,
        folder: Path,
        cache_dir: Path | None = None,
        q8: bool | None = None,
        threads: int | None = None,
    ) -> None:
        config = json.loads((folder / "config.json").read_text())
        self.tokenizer = load_tokenizer(folder)
        self.max_tokens = self.tokenizer.truncation["max_length"]
        self.dim = int(config["hidden_size"])
        threads = threads or os.cpu_count() or 1
        timed = None
        if q8 is None:
            q8, timed = _faster_graph(folder, cache_dir, threads)
        self.q8 = q8
        self._session = timed or _session(prepare_graph(folder, cache_dir, q8), threads)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(texts)]

    def encode_ids(self, batch: list[list[int]]) -> np.ndarray:
        """Embeddings for token-id sequences of similar length (the caller sorts by length)."""
        n, length = len(batch), max(len(ids) for ids in batch)
        ids = np.zeros((n, length), dtype=np.int32)
        mask = np.zeros((n, length), dtype=np.int32)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        (out,) = self._session.run(["embeddings"], {"input_ids": ids, "attention_mask": mask})
        return out

"""A request's prompt as the chat engine feeds it: the GGUF's chat template and its vocabulary.

The engine tokenizes with it before decoding; estimates count with it, from the vocabulary
alone (`vocab_only`: no weights, a fraction of a second) when no decoder is loaded. Counting
must equal what `usage.prompt_tokens` will say, so both go through the same template and the
same llama.cpp tokenizer.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("lowtide.llamacpp")

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CACHED_FRAGMENT_CHARS = 2048  # longer pieces of text are counted, not remembered
_PROBE = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n  Prix: 12,50 € — 3x  \n\n"
    "naïve 東京 🙂<|im_end|><|im_start|>assistant\n<|endoftext|>x  <|im_end|>"
)


def load_vocab(path: Path) -> Any:
    """The GGUF's vocabulary and metadata without its weights."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    from lowtide.engines.llamacpp.weights import quiet_llama

    quiet_llama()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    return LlamaModel(path_model=str(path), params=params, verbose=False)


class PromptTokens:
    """Chat template + tokenizer of one model (a llama_cpp `LlamaModel`, full or vocab-only)."""

    def __init__(self, model: Any, name: str) -> None:
        import llama_cpp

        self._llama = llama_cpp
        self.model = model
        self._name = name
        self._formatter = _chat_formatter(model)
        self._add_bos = bool(model.add_bos_token())
        self._framing = self._count_bytes(b"", add_special=True)  # BOS/EOS the vocab adds
        self._specials = _special_texts(llama_cpp, model.vocab)
        self._fragment = functools.lru_cache(maxsize=4096)(self._count_fragment)
        if self._specials is not None and self._split_count(_PROBE, True) != self._count_bytes(
            _PROBE.encode(), add_special=False
        ):
            log.warning("%s: counting prompt pieces disagrees with llama.cpp; counting whole", name)
            self._specials = None

    # -- what the engine decodes ---------------------------------------------------------
    def text(self, body: dict[str, Any], chat: bool) -> str:
        """The prompt text; ValueError(message, param) for a request the engine refuses."""
        if not chat:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ValueError("'prompt' must be a string.", "prompt")
            return prompt
        if body.get("tools") or body.get("functions"):
            raise ValueError(f"Model '{self._name}' does not support tools.", "tools")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty array.", "messages")
        cleaned = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(
                    f"messages[{i}] must be an object with a 'role'.", f"messages[{i}]"
                )
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(
                    p.get("text", "")
                    for p in content
                    if isinstance(p, dict) and p.get("type") == "text"
                )
            if not isinstance(content, str):
                raise ValueError(
                    f"messages[{i}].content must be a string or text parts.",
                    f"messages[{i}].content",
                )
            role = "system" if message["role"] == "developer" else message["role"]
            cleaned.append({"role": role, "content": content})
        return self._formatter(messages=cleaned).prompt

    def tokenize(self, text: str, chat: bool) -> list[int]:
        return self.model.tokenize(
            text.encode("utf-8"), add_bos=self._add_bos and not chat, special=True
        )

    # -- counting, for estimates -----------------------------------------------------------
    def count(self, body: dict[str, Any], chat: bool) -> int:
        """len(tokenize(text(body))): 0 for a request the engine would refuse (never billed)."""
        try:
            text = self.text(body, chat)
        except ValueError:
            return 0
        add_special = self._add_bos and not chat
        try:
            if self._specials is None:
                return self._count_bytes(text.encode("utf-8"), add_special=add_special)
            return self._split_count(text, add_special)
        except UnicodeEncodeError:  # a lone surrogate: the engine cannot take it either
            return 0

    def _split_count(self, text: str, add_special: bool) -> int:
        """llama.cpp cuts the text at special tokens (longest first) and tokenizes each piece
        alone, so pieces can be counted once and remembered: a system prompt that every line
        repeats costs one tokenizer call, not one a line."""
        pieces: list[str | None] = [text]  # None: a special token
        for special in self._specials or ():
            if special not in text:
                continue
            cut: list[str | None] = []
            for piece in pieces:
                if piece is None or special not in piece:
                    cut.append(piece)
                    continue
                for j, part in enumerate(piece.split(special)):
                    if j:
                        cut.append(None)
                    if part:
                        cut.append(part)
            pieces = cut
        total = self._framing if add_special else 0
        for piece in pieces:
            if piece is None:
                total += 1
            elif len(piece) <= _CACHED_FRAGMENT_CHARS:
                total += self._fragment(piece)
            else:
                total += self._count_fragment(piece)
        return total

    def _count_fragment(self, piece: str) -> int:
        return self._count_bytes(piece.encode("utf-8"), add_special=False, special=False)

    def _count_bytes(self, data: bytes, *, add_special: bool, special: bool = True) -> int:
        # With no room for tokens llama_tokenize returns minus how many it would write.
        n = self._llama.llama_tokenize(
            self.model.vocab, data, len(data), None, 0, add_special, special
        )
        return abs(n)


def _special_texts(llama: Any, vocab: Any) -> list[str] | None:
    """The texts llama.cpp cuts prompts at, longest first; None where pieces cannot be counted
    alone (a vocabulary other than BPE, or special tokens that eat neighbouring spaces)."""
    if llama.llama_vocab_type(vocab) != llama.LLAMA_VOCAB_TYPE_BPE:
        return None
    kinds = llama.LLAMA_TOKEN_ATTR_CONTROL | llama.LLAMA_TOKEN_ATTR_USER_DEFINED
    kinds |= llama.LLAMA_TOKEN_ATTR_UNKNOWN
    strips = llama.LLAMA_TOKEN_ATTR_LSTRIP | llama.LLAMA_TOKEN_ATTR_RSTRIP
    texts = []
    for token in range(llama.llama_vocab_n_tokens(vocab)):
        attr = llama.llama_vocab_get_attr(vocab, token)
        if attr & kinds:
            if attr & strips:
                return None
            texts.append(llama.llama_vocab_get_text(vocab, token).decode("utf-8", "replace"))
    return sorted((t for t in texts if t), key=len, reverse=True)


def _chat_formatter(model: Any) -> Any:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    # A GGUF without a template: ChatML is the common default.
    template = model.metadata().get("tokenizer.chat_template") or _CHATML

    def piece(token: int) -> str:
        # _internals.token_to_piece returns its whole 32-byte buffer: drop the NUL padding.
        raw = model.token_to_piece(token, special=True).rstrip(b"\0") if token >= 0 else b""
        return raw.decode("utf-8", errors="ignore")

    return Jinja2ChatFormatter(
        template=template, eos_token=piece(model.token_eos()), bos_token=piece(model.token_bos())
    )

"""Messages <-> Chat Completions: what carries over, and what is refused by name."""

from __future__ import annotations

import pytest

from lowtide.engines.anthropic_messages import Untranslatable, from_chat, to_chat


def test_messages_params_become_a_chat_body():
    body = to_chat(
        {
            "model": "m",
            "max_tokens": 16,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
                },
            ],
            "stop_sequences": ["\n\n"],
            "temperature": 0.2,
            "top_k": 5,
        }
    )
    assert body == {
        "model": "m",
        "max_tokens": 16,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "AB"},
        ],
        "stop": ["\n\n"],
        "temperature": 0.2,
        "top_k": 5,
    }


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "tools": [],
                "messages": [{"role": "user", "content": "x"}],
            },
            "tools",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
            },
            "image",
        ),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "role"),
    ],
)
def test_what_cannot_be_translated_is_refused_by_name(params, says):
    with pytest.raises(Untranslatable, match=says):
        to_chat(params)


def test_a_chat_answer_becomes_a_message():
    message = from_chat(
        {
            "model": "served",
            "choices": [{"message": {"content": "Paris"}, "finish_reason": "length"}],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 3,
                "prompt_tokens_details": {"cached_tokens": 4},
            },
        },
        "asked",
    )
    assert message["type"] == "message" and message["id"].startswith("msg_")
    assert message["content"] == [{"type": "text", "text": "Paris"}]
    assert message["stop_reason"] == "max_tokens" and message["stop_sequence"] is None
    assert message["usage"] == {
        "input_tokens": 8,
        "output_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
    }
    hit = from_chat(
        {"choices": [{"message": {"content": "a"}, "finish_reason": "stop", "stop_reason": "END"}]},
        "m",
        ["END"],
    )
    assert hit["stop_reason"] == "stop_sequence" and hit["stop_sequence"] == "END"

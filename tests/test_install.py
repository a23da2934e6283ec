"""`pip install` of the project into a fresh virtualenv, with pip alone, serves the defaults:
one named step (`lowtide models install`) and a chat and an embeddings batch run.

Slow the first time on a machine (pip builds llama-cpp-python); pip's wheel cache makes it
about a minute after `make install` has run once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: object, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_a_fresh_virtualenv_with_pip_alone_runs_chat_and_embeddings(tmp_path):
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", venv).returncode == 0
    bin_dir = venv / "bin"
    installed = _run(bin_dir / "pip", "install", "-q", ROOT, timeout=2400)
    assert installed.returncode == 0, installed.stderr[-3000:]
    lowtide = bin_dir / "lowtide"
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps(
            {
                "custom_id": "c-1",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "SmolLM2-135M-Instruct",
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
            }
        )
        + "\n"
    )
    embed = tmp_path / "embed.jsonl"
    embed.write_text(
        json.dumps(
            {
                "custom_id": "e-1",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "all-MiniLM-L6-v2", "input": "The printer is on fire."},
            }
        )
        + "\n"
    )
    data = ["--data-dir", tmp_path / "data"]
    # Without the models: the line fails with an error that names the one command to run.
    before = _run(
        lowtide, "run", chat, "-o", tmp_path / "o0.jsonl", "-e", tmp_path / "e0.jsonl", *data
    )
    assert before.returncode == 1, before.stdout + before.stderr
    assert "lowtide models install" in (tmp_path / "e0.jsonl").read_text()
    step = _run(lowtide, "models", "install", timeout=600)
    assert step.returncode == 0, step.stdout + step.stderr
    for source, out in ((chat, "chat.out.jsonl"), (embed, "embed.out.jsonl")):
        done = _run(lowtide, "run", source, "-o", tmp_path / out, *data)
        assert done.returncode == 0, done.stdout + done.stderr
        (line,) = [json.loads(x) for x in (tmp_path / out).read_text().splitlines()]
        assert line["response"]["status_code"] == 200
    embedding = json.loads((tmp_path / "embed.out.jsonl").read_text())["response"]["body"]
    assert len(embedding["data"][0]["embedding"]) == 384

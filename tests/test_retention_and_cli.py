"""File expiry and removal, output retention, and `lowtide run` with no server."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time

import pytest
from openai import NotFoundError
from support import (
    _env,
    assert_output_exactly_once,
    blob_exists,
    blob_store,
    chat_line,
    jsonl,
    make_config,
    start_sim,
    stop_process,
    submit_batch,
    wait_for_batch,
)


def test_expired_files_vanish_and_their_blobs_are_removed(make_server, sim_url):
    srv = make_server(
        make_config(sim_url, 'default_file_ttl = "2s"').replace(
            "[worker]", "[worker]\nsweep_seconds = 0.3"
        )
    ).start()
    client = srv.client()
    f = client.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([chat_line("a", "b")]))), purpose="batch"
    )
    assert f.expires_at - f.created_at == 2
    assert blob_exists(srv, f"files/{f.id}")
    deadline = time.monotonic() + 15
    while blob_exists(srv, f"files/{f.id}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not blob_exists(srv, f"files/{f.id}")
    with pytest.raises(NotFoundError):
        client.files.retrieve(f.id)
    assert all(x.id != f.id for x in client.files.list())


def test_deleted_input_file_stays_readable_by_its_running_batch(make_server, sim_url):
    srv = make_server(
        make_config(sim_url).replace("[worker]", "[worker]\nsweep_seconds = 0.2")
    ).start()
    client = srv.client()
    f = client.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([chat_line(f"d{i}", "b") for i in range(200)]))),
        purpose="batch",
    )
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    client.files.delete(f.id)
    done = wait_for_batch(client, b.id)
    # Created before the delete landed: the batch either ran fully or could not find its file.
    assert done.status in ("completed", "failed")
    if done.status == "completed":
        assert done.request_counts.completed == 200
    time.sleep(1)
    assert not blob_exists(srv, f"files/{f.id}")


def test_sweeper_removes_what_crashed_processes_left_behind(make_server):
    """Blobs a crash orphans go; committed segments of a running batch stay and it completes."""
    sim, slow_url = start_sim("--latency-ms", "400")
    try:
        srv = make_server(
            make_config(slow_url).replace(
                "[worker]",
                "[worker]\nsweep_seconds = 0.2\norphan_sweep_seconds = 0.3\norphan_grace_seconds = 1",
            )
        ).start()
        client = srv.client()
        finished = submit_batch(client, [chat_line("f0", "x"), chat_line("f1", "y")])
        assert wait_for_batch(client, finished.id).status == "completed"
        running = submit_batch(client, [chat_line(f"r{i}", "x") for i in range(800)])
        wait_for_batch(client, running.id, statuses=("in_progress",))
        store = blob_store(srv)
        orphans = [
            f"segments/{finished.id}/0000000-0000000-finalizer-died.jsonl",
            f"segments/{running.id}/0000099-0000000-never-committed.jsonl",
            "segments/batch_unknown/0000000-0000000-x.jsonl",
            "files/file-never-recorded",
        ]
        for key in orphans:
            asyncio.run(store.put(key, b"{}\n"))
        deadline = time.monotonic() + 20
        while any(blob_exists(srv, k) for k in orphans) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [k for k in orphans if blob_exists(srv, k)] == []
        assert client.batches.retrieve(running.id).status == "in_progress"
        # The running batch's committed segments were kept: finalize reads every one of them.
        assert wait_for_batch(client, running.id, timeout=60).status == "completed"
        assert_output_exactly_once(client, client.batches.retrieve(running.id), 800)
        assert "removed" in srv.log()
    finally:
        stop_process(sim)


def test_output_expires_after(client):
    f = client.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([chat_line("o", "b")]))), purpose="batch"
    )
    b = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    done = wait_for_batch(client, b.id)
    out = client.files.retrieve(done.output_file_id)
    assert out.expires_at - out.created_at == 7200


def _lowtide(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lowtide.cli", *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
    )


def test_run_command_without_a_server(tmp_path, sim_url):
    config = tmp_path / "c.toml"
    config.write_text(make_config(sim_url))
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        jsonl(
            [chat_line(f"q{i}", f"hello {i}") for i in range(50)]
            + [chat_line("bad", "x", sim_fault=400)]
        )
    )
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    proc = _lowtide("run", str(src), "-o", str(out), "--errors", str(err), "--config", str(config))
    assert proc.returncode == 1, proc.stderr  # one line failed
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [f"q{i}" for i in range(50)]
    assert lines[0]["response"]["body"]["choices"][0]["message"]["content"] == "echo: hello 0"
    assert [json.loads(x)["custom_id"] for x in err.read_text().splitlines()] == ["bad"]
    assert "50 succeeded, 1 failed" in proc.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"custom_id": 1}\n')
    proc = _lowtide("run", str(bad), "-o", str(out), "--config", str(config))
    assert proc.returncode == 2 and "line 1" in proc.stderr


def test_run_command_on_defaults(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([chat_line(f"e{i}", "x", model="lowtide-echo") for i in range(10)]))
    proc = _lowtide("run", str(src), "-o", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 10

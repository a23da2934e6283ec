"""The client commands (`lowtide submit`, `batches ...`, `files ...`) against a real server.

Commands run as a user runs them: a subprocess with LOWTIDE_URL pointing at the test server
(exit codes, Ctrl-C, environment precedence), or, where only their output is checked, in this
process through Typer's runner (an interpreter start-up costs seconds here). The OpenAI SDK in
the test checks what the commands did.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.progress import Progress
from support import (
    LowtideServer,
    _env,
    chat_line,
    free_port,
    jsonl,
    make_config,
    start_sim,
    stop_process,
    wait_for_batch,
)

from lowtide.cli.client import normalize_url, resolve
from lowtide.cli.progress import EtaColumn, LineCountsColumn, LinesPerSecondColumn

CLIENT_VARS = ("LOWTIDE_URL", "LOWTIDE_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY")


def _cli_env(url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in _env().items() if k not in CLIENT_VARS}
    if url is not None:
        env["LOWTIDE_URL"] = url
    return {**env, **extra}


def _lowtide(
    *args: str, url: str | None, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lowtide.cli", *args],
        capture_output=True,
        text=True,
        env=_cli_env(url, **env),
        timeout=timeout,
    )


def _inproc(*args: str, url: str | None, **env: str) -> subprocess.CompletedProcess:
    """The same command run in this process (no interpreter start-up: ~10x faster here)."""
    from typer.testing import CliRunner

    from lowtide.cli import app

    unset: dict[str, str | None] = dict.fromkeys(CLIENT_VARS)
    extra = {"LOWTIDE_URL": url} if url is not None else {}
    result = CliRunner().invoke(app, list(args), env={**unset, **extra, **env})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def _echo_lines(n: int, prefix: str = "e") -> list[dict]:
    return [chat_line(f"{prefix}{i}", f"hello {i}", model="lowtide-echo") for i in range(n)]


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_bytes(jsonl(lines))
    return path


def _ids(path: Path) -> list[str]:
    return [json.loads(x)["custom_id"] for x in path.read_text().splitlines()]


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


# --- submit ----------------------------------------------------------------------------------


def test_submit_waits_and_downloads_every_line(server, client, tmp_path):
    src = _write(tmp_path / "req.jsonl", _echo_lines(25))
    proc = _lowtide(
        "submit", str(src), "--poll", "0.2", "-m", "team=nlp", "-m", "run=7", url=server.base_url
    )
    assert proc.returncode == 0, proc.stderr
    batch_id = proc.stdout.splitlines()[0].strip()
    assert batch_id.startswith("batch_")
    # Default names: beside the input file; no errors file when nothing failed.
    assert _ids(tmp_path / "req.output.jsonl") == [f"e{i}" for i in range(25)]
    assert not (tmp_path / "req.errors.jsonl").exists()
    assert "25 succeeded, 0 failed of 25" in proc.stderr
    batch = client.batches.retrieve(batch_id)
    assert batch.status == "completed" and batch.metadata == {"team": "nlp", "run": "7"}
    assert batch.endpoint == "/v1/chat/completions"  # taken from the file's first line


def test_submit_with_a_failing_line_exits_1_and_writes_the_errors_file(server, tmp_path):
    lines = [chat_line(f"s{i}", f"fine {i}") for i in range(10)]
    lines.append(chat_line("bad", "x", sim_fault=400))  # the simulator answers 400: not retried
    src = _write(tmp_path / "mixed.jsonl", lines)
    out, errs = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    proc = _lowtide(
        "submit", str(src), "-o", str(out), "-e", str(errs), "--poll", "0.2", url=server.base_url
    )
    assert proc.returncode == 1, proc.stderr
    assert _ids(out) == [f"s{i}" for i in range(10)]
    assert _ids(errs) == ["bad"]
    assert "10 succeeded, 1 failed of 11" in proc.stderr


def test_submit_invalid_file_exits_2_with_line_numbers(server, tmp_path):
    lines = _echo_lines(4)
    lines[2]["body"]["model"] = "no-such-model"
    src = _write(tmp_path / "invalid.jsonl", lines)
    proc = _lowtide("submit", str(src), "--poll", "0.2", url=server.base_url)
    assert proc.returncode == 2, proc.stderr
    assert "failed validation" in proc.stderr
    assert "line 3: model_not_found" in proc.stderr
    assert not (tmp_path / "invalid.output.jsonl").exists()


def test_submit_a_file_the_server_refuses_exits_2(server, tmp_path):
    src = tmp_path / "notjson.jsonl"
    src.write_text("this is not JSON\n")
    proc = _lowtide("submit", str(src), url=server.base_url)
    assert proc.returncode == 2, proc.stderr
    assert "400" in proc.stderr
    bad_meta = _lowtide("submit", str(src), "-m", "no-equals-sign", url=server.base_url)
    assert bad_meta.returncode == 2 and "KEY=VALUE" in bad_meta.stderr


def test_submit_no_wait_prints_only_the_id(server, client, tmp_path):
    src = _write(tmp_path / "nowait.jsonl", _echo_lines(3, "n"))
    proc = _lowtide("submit", str(src), "--no-wait", url=server.base_url)
    assert proc.returncode == 0, proc.stderr
    batch_id = proc.stdout.strip()
    assert wait_for_batch(client, batch_id).status == "completed"
    assert not (tmp_path / "nowait.output.jsonl").exists()


def test_unreachable_server_exits_3(tmp_path):
    src = _write(tmp_path / "r.jsonl", _echo_lines(1))
    proc = _lowtide("submit", str(src), url=_dead_url())
    assert proc.returncode == 3, proc.stderr
    assert "cannot reach" in proc.stderr
    assert _inproc("batches", "list", url=_dead_url()).returncode == 3
    assert _inproc("batches", "results", "batch_x", url=_dead_url()).returncode == 3


# --- where the server is and which key -------------------------------------------------------


def test_server_and_key_resolution_order():
    env = {
        "LOWTIDE_URL": "http://lowtide:1",
        "OPENAI_BASE_URL": "http://openai:2/v1",
        "LOWTIDE_API_KEY": "k-lowtide",
        "OPENAI_API_KEY": "k-openai",
    }
    assert resolve("http://flag:3/", "k-flag", env).base_url == "http://flag:3/v1"
    assert resolve("http://flag:3/", "k-flag", env).api_key == "k-flag"
    assert resolve(None, None, env).base_url == "http://lowtide:1/v1"
    assert resolve(None, None, env).api_key == "k-lowtide"
    only_openai = {"OPENAI_BASE_URL": "http://openai:2/v1", "OPENAI_API_KEY": "k-openai"}
    assert resolve(None, None, only_openai).base_url == "http://openai:2/v1"
    assert resolve(None, None, only_openai).api_key == "k-openai"
    assert resolve(None, None, {}).base_url == "http://127.0.0.1:8080/v1"
    assert (
        normalize_url("http://h:8080/v1/") == normalize_url("http://h:8080") == "http://h:8080/v1"
    )


def test_server_precedence_end_to_end(server):
    live, dead = server.base_url, _dead_url()
    # --server beats LOWTIDE_URL
    assert _lowtide("files", "list", "--server", live, url=dead).returncode == 0
    # LOWTIDE_URL beats OPENAI_BASE_URL
    assert _lowtide("files", "list", url=dead, OPENAI_BASE_URL=live).returncode == 3
    # OPENAI_BASE_URL when nothing else is set; the URL without /v1 works too
    bare = live.removesuffix("/v1")
    assert _lowtide("files", "list", url=None, OPENAI_BASE_URL=bare).returncode == 0


def test_api_key_precedence_and_refused_key(make_server, sim_url):
    srv = make_server(
        make_config(sim_url, '[auth]\napi_keys = [{ key = "sk-good", project = "p" }]')
    ).start()
    url = srv.base_url
    ok = _inproc("files", "list", url=url, LOWTIDE_API_KEY="sk-good", OPENAI_API_KEY="sk-bad")
    assert ok.returncode == 0, ok.stderr
    flag = _inproc("files", "list", "--api-key", "sk-bad", url=url, LOWTIDE_API_KEY="sk-good")
    assert flag.returncode == 3 and "refused the API key" in flag.stderr
    assert _inproc("files", "list", url=url, OPENAI_API_KEY="sk-good").returncode == 0
    assert _inproc("batches", "results", "batch_x", url=url, OPENAI_API_KEY="no").returncode == 3


# --- batches ---------------------------------------------------------------------------------


def test_batches_list_get_and_results(server, tmp_path):
    src = _write(tmp_path / "lg.jsonl", _echo_lines(12, "lg"))
    batch_id = _inproc("submit", str(src), "--no-wait", url=server.base_url).stdout.strip()
    got = _inproc(
        "batches", "get", batch_id, "--wait", "--json", "--poll", "0.2", url=server.base_url
    )
    assert got.returncode == 0, got.stderr
    obj = json.loads(got.stdout)
    assert obj["id"] == batch_id and obj["status"] == "completed"
    assert obj["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    assert "lowtide" in obj  # the raw object, extension included

    listed = _inproc("batches", "list", "--json", "--limit", "100", url=server.base_url)
    assert listed.returncode == 0, listed.stderr
    assert batch_id in [b["id"] for b in json.loads(listed.stdout)["data"]]
    failed_only = _inproc("batches", "list", "--json", "--status", "failed", url=server.base_url)
    assert all(b["status"] == "failed" for b in json.loads(failed_only.stdout)["data"])
    table = _inproc("batches", "list", url=server.base_url)
    assert batch_id in table.stdout and "completed" in table.stdout
    shown = _inproc("batches", "get", batch_id, url=server.base_url)
    assert shown.returncode == 0 and batch_id in shown.stdout and "12 ok" in shown.stdout

    out = tmp_path / "results.jsonl"
    res = _inproc(
        "batches", "results", batch_id, "--type", "output", "-o", str(out), url=server.base_url
    )
    assert res.returncode == 0, res.stderr
    assert _ids(out) == [f"lg{i}" for i in range(12)]
    to_stdout = _inproc("batches", "results", batch_id, url=server.base_url)
    assert [json.loads(x)["custom_id"] for x in to_stdout.stdout.splitlines()] == _ids(out)
    errors_only = _inproc("batches", "results", batch_id, "--type", "error", url=server.base_url)
    assert errors_only.returncode == 0 and errors_only.stdout == ""

    missing = _inproc("batches", "get", "batch_doesnotexist", url=server.base_url)
    assert missing.returncode == 1 and "404" in missing.stderr
    missing = _inproc("batches", "results", "batch_doesnotexist", url=server.base_url)
    assert missing.returncode == 1 and "404" in missing.stderr


def test_retry_reruns_the_failed_line(server, client, tmp_path):
    # Every attempt of the first run fails (1 + max_retries = 9 receipts); the retry's succeeds.
    lines = [chat_line(f"r{i}", f"retry me {i} {tmp_path.name}") for i in range(5)]
    lines.append(chat_line("flaky", f"flaky {tmp_path.name}", sim_fail_first=9))
    src = _write(tmp_path / "flaky.jsonl", lines)
    first = _lowtide("submit", str(src), "--poll", "0.2", url=server.base_url)
    assert first.returncode == 1, first.stderr
    batch_id = first.stdout.splitlines()[0].strip()
    assert _ids(tmp_path / "flaky.errors.jsonl") == ["flaky"]

    retried = _inproc(
        "batches", "retry", batch_id, "--custom-id", "flaky", "--wait", "--poll", "0.2",
        url=server.base_url,
    )  # fmt: skip
    assert retried.returncode == 0, retried.stderr
    batch = client.batches.retrieve(batch_id)
    assert batch.status == "completed" and batch.request_counts.failed == 0
    assert batch.model_extra["lowtide"]["retries"] == 1
    merged = _inproc("batches", "results", batch_id, "--type", "output", url=server.base_url)
    assert [json.loads(x)["custom_id"] for x in merged.stdout.splitlines()] == [
        *(f"r{i}" for i in range(5)),
        "flaky",
    ]
    # No such batch: the server's 404, exit 1.
    assert _inproc("batches", "retry", "batch_doesnotexist", url=server.base_url).returncode == 1


def test_estimate_on_the_server(server, client, tmp_path):
    src = _write(tmp_path / "est.jsonl", _echo_lines(7, "est"))
    before = {f.id for f in client.files.list()}
    proc = _inproc("batches", "estimate", str(src), "--json", url=server.base_url)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["object"] == "batch.estimate" and found["lines"] == 7
    assert found["endpoint"] == "/v1/chat/completions"
    assert {f.id for f in client.files.list()} == before  # the upload was deleted again
    human = _lowtide("batches", "estimate", str(src), url=server.base_url)
    assert human.returncode == 0 and "estimate: 7 lines" in human.stdout


# --- waiting, Ctrl-C and cancel on a slow upstream ---------------------------------------------


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    sim, url = start_sim("--latency-ms", "200")
    config = make_config(url).replace("max_concurrency = 32", "max_concurrency = 2")
    srv = LowtideServer(tmp_path_factory.mktemp("slow") / "data", config).start()
    yield srv
    srv.stop()
    stop_process(sim)


def test_ctrl_c_leaves_the_batch_running_then_cancel(slow_server, tmp_path):
    client = slow_server.client()
    src = _write(tmp_path / "slow.jsonl", [chat_line(f"w{i}", f"slow {i}") for i in range(100)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowtide.cli", "submit", str(src), "--poll", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_cli_env(slow_server.base_url),
    )
    try:
        batch_id = proc.stdout.readline().strip()
        assert batch_id.startswith("batch_"), proc.stderr.read() if proc.poll() else batch_id
        wait_for_batch(client, batch_id, statuses=("in_progress",))
        time.sleep(0.5)  # in the wait loop
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert f"lowtide batches get {batch_id} --wait" in stderr
    assert client.batches.retrieve(batch_id).status == "in_progress"  # not cancelled

    cancel = _inproc("batches", "cancel", batch_id, url=slow_server.base_url)
    assert cancel.returncode == 0, cancel.stderr
    assert cancel.stdout.strip() in (f"{batch_id}: cancelling", f"{batch_id}: cancelled")
    waited = _inproc(
        "batches", "get", batch_id, "--wait", "--poll", "0.2", url=slow_server.base_url
    )
    assert waited.returncode == 1, waited.stderr  # cancelled: not every line succeeded
    assert "cancelled" in waited.stdout
    # Cancelling a cancelled batch returns it.
    again = _inproc("batches", "cancel", batch_id, "--json", url=slow_server.base_url)
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "cancelled"


# --- files -----------------------------------------------------------------------------------


def test_files_commands(server, tmp_path):
    src = _write(tmp_path / "up.jsonl", _echo_lines(2, "f"))
    up = _inproc("files", "upload", str(src), url=server.base_url)
    assert up.returncode == 0, up.stderr
    file_id = up.stdout.strip()
    listed = json.loads(
        _inproc("files", "list", "--json", "--limit", "100", url=server.base_url).stdout
    )
    assert file_id in [f["id"] for f in listed["data"]]
    got = _inproc("files", "get", file_id, "--json", url=server.base_url)
    assert got.returncode == 0 and json.loads(got.stdout)["bytes"] == src.stat().st_size
    table = _inproc("files", "get", file_id, url=server.base_url)
    assert file_id in table.stdout and "up.jsonl" in table.stdout
    copy = tmp_path / "copy.jsonl"
    assert (
        _inproc("files", "content", file_id, "-o", str(copy), url=server.base_url).returncode == 0
    )
    assert copy.read_bytes() == src.read_bytes()
    to_stdout = _inproc("files", "content", file_id, url=server.base_url)
    assert to_stdout.stdout.encode() == src.read_bytes()
    deleted = _inproc("files", "delete", file_id, url=server.base_url)
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    gone = _inproc("files", "get", file_id, url=server.base_url)
    assert gone.returncode == 1 and "404" in gone.stderr


# --- progress columns (also used by `lowtide run`) --------------------------------------------


def test_progress_columns_prefer_the_servers_figures():
    with Progress(disable=True) as bar:
        task_id = bar.add_task("in_progress", total=100, completed=40, ok=38, failed=2, rate=12.5)
        task = bar.tasks[task_id]
        assert LinesPerSecondColumn().render(task).plain == "12.5 lines/s"
        assert LineCountsColumn().render(task).plain == "38 ok, 2 failed / 100"
        bar.update(task_id, eta=3725)
        assert EtaColumn().render(task).plain == "ETA 1:02:05"
        plain = bar.add_task("x", total=10)
        assert LinesPerSecondColumn().render(bar.tasks[plain]).plain == "- lines/s"
        assert EtaColumn().render(bar.tasks[plain]).plain == "ETA -:--:--"


def test_help_lists_the_client_commands():
    proc = _lowtide("--help", url=None, COLUMNS="200")
    for name in ("submit", "batches", "files", "run", "estimate", "serve"):
        assert name in proc.stdout

"""Files API details and project isolation."""

from __future__ import annotations

import io

import httpx
import pytest
from openai import AuthenticationError, NotFoundError
from support import chat_line, jsonl, make_config, wait_for_batch


def test_file_lifecycle_and_pagination(client):
    ids = [
        client.files.create(
            file=(f"f{i}.jsonl", io.BytesIO(jsonl([chat_line("a", str(i))]))), purpose="batch"
        ).id
        for i in range(5)
    ]
    page = client.files.list(limit=2, order="asc", purpose="batch")
    assert page.has_more and len(page.data) == 2
    every = [f.id for f in client.files.list(limit=2, order="asc", purpose="batch")]
    assert every[-5:] == ids and len(every) == len(set(every))
    newest = [f.id for f in client.files.list(limit=3).data]
    assert newest == ids[::-1][:3]
    assert client.files.content(ids[0]).content == jsonl([chat_line("a", "0")])
    deleted = client.files.delete(ids[0])
    assert deleted.deleted and deleted.id == ids[0]
    with pytest.raises(NotFoundError):
        client.files.retrieve(ids[0])
    with pytest.raises(NotFoundError):
        client.files.content(ids[0])
    with pytest.raises(NotFoundError):
        client.files.delete(ids[0])


def test_other_purposes_and_expiry(client):
    f = client.files.create(file=("notes.txt", io.BytesIO(b"anything")), purpose="user_data")
    assert f.expires_at is None
    f = client.files.create(
        file=("e.jsonl", io.BytesIO(jsonl([chat_line("a", "b")]))),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert f.expires_at == f.created_at + 3600
    from openai import BadRequestError

    with pytest.raises(BadRequestError):
        client.files.create(file=("x", io.BytesIO(b"x")), purpose="nonsense")
    with pytest.raises(BadRequestError):
        client.files.create(
            file=("e.jsonl", io.BytesIO(b"{}")),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 10},
        )


def test_malformed_uploads_get_clear_errors(server):
    url = server.base_url + "/files"
    auth = {"Authorization": "Bearer k"}
    r = httpx.post(url, headers=auth, json={"purpose": "batch"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]
    r = httpx.post(url, headers=auth, data={"purpose": "batch"}, files={"other": ("a", b"{}")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = httpx.post(url, headers=auth, files={"file": ("a.jsonl", b"{}\n")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    assert r.headers["x-request-id"].startswith("req_")
    r = httpx.get(server.base_url + "/nothing-here", headers=auth)
    assert r.status_code == 404 and "error" in r.json()


def test_projects_are_isolated_and_keys_checked(make_server, sim_url):
    keys = '\n[auth]\napi_keys = [{ key = "sk-a", project = "team-a" }, { key = "sk-b", project = "team-b" }]\n'
    srv = make_server(make_config(sim_url) + keys).start()
    a, b = srv.client("sk-a"), srv.client("sk-b")
    f = a.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line("x", "y")]))), purpose="batch")
    batch = a.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for_batch(a, batch.id)
    assert done.status == "completed"
    for call in (
        lambda: b.files.retrieve(f.id),
        lambda: b.files.content(f.id),
        lambda: b.files.delete(f.id),
        lambda: b.files.content(done.output_file_id),
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
    ):
        with pytest.raises(NotFoundError):
            call()
    assert b.files.list().data == [] and b.batches.list().data == []
    # B's batch over A's file fails: the file does not exist for B.
    other = wait_for_batch(
        b,
        b.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert other.status == "failed" and other.errors.data[0].param == "file_id"
    with pytest.raises(AuthenticationError) as info:
        srv.client("sk-wrong").files.list()
    assert info.value.code == "invalid_api_key"
    r = httpx.get(srv.base_url + "/files")
    assert r.status_code == 401 and r.json()["error"]["message"]


def test_non_loopback_without_keys_is_refused(tmp_path):
    import subprocess
    import sys

    from support import _env

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowtide.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "1",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 2 and "no API keys" in proc.stderr


def test_hostile_inputs_get_4xx_not_500(server, client):
    auth = {"Authorization": "Bearer k"}
    # A body cut off before its closing boundary is refused, and leaves no file behind.
    before = {f.id for f in client.files.list()}
    body = b'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"x": 1}\n'
    r = httpx.post(
        server.base_url + "/files",
        headers={**auth, "Content-Type": "multipart/form-data; boundary=XyZ"},
        content=body,
    )
    assert r.status_code == 400 and "incomplete" in r.json()["error"]["message"]
    assert {f.id for f in client.files.list()} == before
    # A boundary longer than the parser allows.
    r = httpx.post(
        server.base_url + "/files",
        headers={**auth, "Content-Type": "multipart/form-data; boundary=" + "b" * 300},
        content=b"x",
    )
    assert r.status_code == 400
    # Odd numbers in expires_after.
    r = httpx.post(
        server.base_url + "/files",
        headers=auth,
        data={
            "purpose": "batch",
            "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "²",
        },
        files={"file": ("a.jsonl", b"{}\n")},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "expires_after.seconds"
    # A huge JSON body is refused before it is read.
    r = httpx.post(
        server.base_url + "/batches",
        headers={**auth, "Content-Type": "application/json"},
        content=b"{" + b" " * (2 << 20) + b"}",
    )
    assert r.status_code == 413
    # Over-long ids and windows are validation errors.
    r = httpx.post(
        server.base_url + "/batches",
        headers=auth,
        json={
            "input_file_id": "f" * 500,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_file_id"
    # Wrong types in the create body and bad query values.
    r = httpx.post(
        server.base_url + "/batches",
        headers=auth,
        json={"input_file_id": 5, "endpoint": [], "completion_window": None},
    )
    assert r.status_code == 400
    assert httpx.get(server.base_url + "/batches?limit=0", headers=auth).status_code == 400
    assert httpx.get(server.base_url + "/files?order=sideways", headers=auth).status_code == 400


def test_unicode_filenames_download_and_unknown_cursor(client):
    f = client.files.create(
        file=("日本 report.jsonl", io.BytesIO(jsonl([chat_line("u", "v")]))), purpose="batch"
    )
    raw = client.files.with_raw_response.content(f.id)
    assert "filename*=UTF-8''" in raw.headers["content-disposition"]
    assert client.files.content(f.id).content == jsonl([chat_line("u", "v")])
    assert client.files.retrieve(f.id).filename == "日本 report.jsonl"
    page = client.files.list(after="file-doesnotexist", limit=5)
    assert page.data == [] and not page.has_more
    assert client.batches.list(after="batch_doesnotexist").data == []


def test_route_without_base_url_is_a_config_error(tmp_path):
    import subprocess
    import sys

    from support import _env

    config = tmp_path / "c.toml"
    config.write_text('[[models]]\nname = "m"\nengine = "openai"\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowtide.cli",
            "serve",
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 2 and "base_url" in proc.stderr

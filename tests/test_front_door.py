"""The front door under abuse: no key costs nothing, bodies are bounded however they are sent,
and slow or idle connections are closed instead of locking everyone else out."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from support import make_config

AUTH = '[auth]\napi_keys = [{ key = "sk-door", project = "door" }]\n'
MB = 1024 * 1024


def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def _send_and_read(port: int, head: bytes, body_chunks, timeout: float = 20.0) -> bytes:
    """Send a request while a second thread reads: the answer may come before the body ends."""
    conn = socket.create_connection(("127.0.0.1", port))
    conn.settimeout(timeout)
    answer = bytearray()

    def read() -> None:
        try:
            while chunk := conn.recv(65536):
                answer.extend(chunk)
        except OSError:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    try:
        conn.sendall(head)
        for chunk in body_chunks:
            conn.sendall(chunk)
            if answer:
                break
    except OSError:
        pass  # the server closed the connection: that is the point
    reader.join(timeout)
    conn.close()
    return bytes(answer)


def _chunked(total: int, piece: int = 64 * 1024):
    sent = 0
    block = b"x" * piece
    while sent < total:
        yield f"{piece:x}\r\n".encode() + block + b"\r\n"
        sent += piece
    yield b"0\r\n\r\n"


@pytest.fixture
def door(make_server, sim_url):
    extra = AUTH + "[server]\nheader_timeout = 2\nread_timeout = 2\n"
    return make_server(make_config(sim_url, extra)).start()


def test_unauthenticated_request_is_refused_before_its_body(door):
    head = (
        f"POST /v1/batches HTTP/1.1\r\nHost: 127.0.0.1:{door.port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 300000000\r\n\r\n"
    ).encode()
    started = time.monotonic()
    answer = _send_and_read(door.port, head, [])  # not one body byte is sent
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"missing_api_key" in answer and time.monotonic() - started < 5


@pytest.mark.parametrize("path", ["/v1/batches", "/v1/batches/batch_x/cancel"])
def test_chunked_json_bodies_over_the_limit_get_413_in_bounded_memory(door, path):
    pid = door.proc.pid
    before = _rss_kib(pid, "VmRSS")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{door.port}\r\n"
        "Authorization: Bearer sk-door\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    answer = _send_and_read(door.port, head, _chunked(50 * MB))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"code":"body_too_large"' in answer
    peak = _rss_kib(pid, "VmHWM")
    assert peak - before < 20 * 1024, f"server grew {peak - before} KiB"
    # The server is still healthy and still answers real requests.
    r = httpx.get(f"{door.base_url}/batches", headers={"Authorization": "Bearer sk-door"})
    assert r.status_code == 200


def test_declared_oversized_json_body_gets_413_without_reading_it(door):
    head = (
        f"POST /v1/batches HTTP/1.1\r\nHost: 127.0.0.1:{door.port}\r\n"
        "Authorization: Bearer sk-door\r\nContent-Type: application/json\r\n"
        "Content-Length: 52428800\r\n\r\n"
    ).encode()
    assert _send_and_read(door.port, head, []).startswith(b"HTTP/1.1 413")


def test_half_open_connections_are_closed_and_health_keeps_answering(door):
    held = []
    for _ in range(200):
        conn = socket.create_connection(("127.0.0.1", door.port))
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never end
        held.append(conn)
    try:
        for _ in range(3):  # while they are held, everyone else is still served
            assert httpx.get(f"http://127.0.0.1:{door.port}/healthz", timeout=5).status_code == 200
            time.sleep(0.3)
        deadline = time.monotonic() + 10  # header_timeout is 2 s
        open_ = list(held)
        while open_ and time.monotonic() < deadline:
            still = []
            for conn in open_:
                conn.settimeout(0.05)
                try:
                    if conn.recv(1) != b"":
                        still.append(conn)
                except TimeoutError:
                    still.append(conn)
                except OSError:
                    pass
            open_ = still
        assert not open_, f"{len(open_)} of 200 half-open connections still open"
    finally:
        for conn in held:
            conn.close()


def test_a_body_that_stops_arriving_is_cut_off(door):
    conn = socket.create_connection(("127.0.0.1", door.port))
    conn.settimeout(10)
    conn.sendall(
        b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-door\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    started = time.monotonic()
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass
    assert time.monotonic() - started < 8  # read_timeout is 2 s
    conn.close()


def test_characters_no_database_can_store_are_refused_not_a_500(door):
    """PostgreSQL text cannot hold NUL and no database stores a lone surrogate: such ids and
    cursors match nothing, and such bodies are 400s, never a server error."""
    auth = {"Authorization": "Bearer sk-door"}
    base = door.base_url
    assert httpx.get(f"{base}/files/file-%00", headers=auth).status_code == 404
    assert httpx.get(f"{base}/batches/batch_%00x", headers=auth).status_code == 404
    assert httpx.post(f"{base}/batches/batch_%00/cancel", headers=auth).status_code == 404
    for url in (
        f"{base}/files?after=a%00b",
        f"{base}/files?purpose=%00",
        f"{base}/batches?after=%00",
    ):
        r = httpx.get(url, headers=auth)
        assert r.status_code == 200 and r.json()["data"] == [], url
    for body, param in (
        (
            b'{"input_file_id": "f\\u0000", "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
            "input_file_id",
        ),
        (
            b'{"input_file_id": "f\\ud800", "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
            None,
        ),
        (
            b'{"input_file_id": "f\xff", "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
            None,
        ),
    ):
        r = httpx.post(
            f"{base}/batches", content=body, headers={**auth, "Content-Type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    form = (  # written by hand: clients escape a NUL in a filename, a hostile one need not
        b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="in\x00.jsonl"\r\n\r\n'
        b'{"a": 1}\n\r\n--xyz--\r\n'
    )
    r = httpx.post(
        f"{base}/files",
        content=form,
        headers={**auth, "Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert r.status_code == 400 and "NUL" in r.json()["error"]["message"]

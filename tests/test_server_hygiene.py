"""What a new user sees first: clear answers to empty requests, and a quiet, readable log."""

from __future__ import annotations

import socket
import time

import httpx
from support import make_config


def test_create_batch_without_a_body_says_so(server):
    r = httpx.post(server.base_url + "/batches", headers={"Authorization": "Bearer k"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert "None" not in error["message"] and "body" in error["message"]
    assert error["code"] == "missing_required_parameter"


def test_log_is_quiet_on_start_and_on_a_client_hanging_up(make_server, sim_url):
    srv = make_server(make_config(sim_url)).start()
    # A client that sends half a multipart upload and hangs up.
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
        "Authorization: Bearer k\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
        "Content-Length: 100000\r\n\r\n"
        '--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        '{"custom_id": "a"'
    )
    with socket.create_connection(("127.0.0.1", srv.port)) as conn:
        conn.sendall(head.encode())
        time.sleep(0.3)
    time.sleep(0.5)
    assert httpx.get(f"http://127.0.0.1:{srv.port}/healthz").status_code == 200
    log = srv.log()
    assert "Traceback" not in log, log
    assert "alembic" not in log.lower(), log

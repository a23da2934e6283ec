"""Webhooks when a batch ends: real servers, a real receiver, every delivery verified with the
official SDK's `client.webhooks.unwrap`."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from openai import OpenAI
from support import LowtideServer, chat_line, jsonl, make_config, wait_for_batch

from lowtide.config import Config


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


S_ALL, S_TEAM_B, S_FAILED, S_FLAKY, S_BATCH, S_CRASH = (_secret() for _ in range(6))
SDK = OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")


class Receiver:
    """An HTTP server that records every POST; a path can be told to answer 500 N times."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes, int]] = []
        self.failures: dict[str, int] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    left = receiver.failures.get(self.path, 0)
                    status = 500 if left > 0 else 200
                    receiver.failures[self.path] = max(left - 1, 0)
                    receiver.received.append(
                        (self.path, {k.lower(): v for k, v in self.headers.items()}, body, status)
                    )
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok" if status == 200 else b"no")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def at(self, path: str) -> list[tuple[dict[str, str], bytes, int]]:
        with self.lock:
            return [(h, b, s) for p, h, b, s in self.received if p == path]

    def wait(self, path: str, count: int, timeout: float = 30) -> list[tuple[dict, bytes, int]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.at(path)
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise TimeoutError(f"{path}: {len(self.at(path))} deliveries, expected {count}")

    def events(self, path: str, secret: str, count: int) -> dict[str, object]:
        """The first `count` 2xx deliveries at `path`, verified: batch id -> event."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = [(h, b) for h, b, s in self.at(path) if s == 200]
            if len(ok) >= count:
                break
            time.sleep(0.05)
        events: dict[str, object] = {}
        for headers, body in ok:
            assert headers["content-type"] == "application/json"
            assert headers["webhook-id"].startswith("msg_")
            event = SDK.webhooks.unwrap(body, headers, secret=secret)
            assert event.object == "event" and event.id.startswith("evt_")
            assert abs(event.created_at - time.time()) < 120
            # One event per batch end, whatever was delivered again (a resend).
            assert events.setdefault(event.data.id, event).id == event.id  # type: ignore[attr-defined]
        assert len(ok) >= count, (path, len(ok))
        return events


KEYS = {"team-a": "sk-a", "team-b": "sk-b", "flaky": "sk-flaky"}
MODELS = """
[[models]]
name = "lowtide-echo"
engine = "echo"

[[models]]
name = "slow-echo"
engine = "echo"
latency_ms = 3000
"""
WORKER = """[worker]
webhook_retry_base_seconds = 0.2
webhook_retry_max_seconds = 1
webhook_timeout_seconds = 2
"""


def _config(receiver: Receiver, extra: str = "") -> str:
    keys = ", ".join(f'{{ key = "{k}", project = "{p}" }}' for p, k in KEYS.items())
    webhooks = f"""
[auth]
api_keys = [{keys}]

[[webhooks]]
url = "{receiver.url("/all")}"
secret = "{S_ALL}"

[[webhooks]]
url = "{receiver.url("/team-b")}"
secret = "{S_TEAM_B}"
projects = ["team-b"]

[[webhooks]]
url = "{receiver.url("/failed")}"
secret = "{S_FAILED}"
events = ["batch.failed"]

[[webhooks]]
url = "{receiver.url("/flaky")}"
secret = "{S_FLAKY}"
projects = ["flaky"]

[batch_webhooks]
secret = "{S_BATCH}"
allowed_hosts = ["localhost"]
{extra}"""
    return make_config(extra=webhooks, models=MODELS).replace("[worker]\n", WORKER, 1)


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def hooked(receiver, tmp_path_factory):
    srv = LowtideServer(tmp_path_factory.mktemp("webhooks") / "data", _config(receiver)).start()
    yield srv
    srv.stop()


def _submit(client: OpenAI, lines: list[dict], window: str = "24h", **extra: object):
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
        extra_body=extra or None,
    )


def _lines(n: int, model: str = "lowtide-echo") -> list[dict]:
    return [chat_line(f"q-{i}", f"hello {i}", model=model) for i in range(n)]


def _deliveries(server: LowtideServer, key: str, batch_id: str) -> httpx.Response:
    return httpx.get(
        f"{server.base_url}/batches/{batch_id}/webhook_deliveries",
        headers={"Authorization": f"Bearer {key}"},
    )


def _delivered(server: LowtideServer, key: str, batch_id: str, count: int) -> list[dict]:
    """The batch's deliveries once `count` of them are delivered (outcomes are recorded just
    after the receiver answers)."""
    deadline = time.monotonic() + 15
    while True:
        data = _deliveries(server, key, batch_id).json()["data"]
        done = [d for d in data if d["status"] == "delivered"]
        if len(done) >= count or time.monotonic() > deadline:
            return sorted(data, key=lambda d: d["target"])
        time.sleep(0.1)


def test_every_end_is_announced_signed_and_filtered(hooked, receiver):
    client = hooked.client(KEYS["team-a"])
    completed = _submit(client, _lines(3))
    bad = [*_lines(2), {**chat_line("x", "x", model="lowtide-echo"), "method": "GET"}]
    failed = _submit(client, bad)
    cancelled = _submit(client, _lines(4, "slow-echo"))
    client.batches.cancel(cancelled.id)
    expired = _submit(client, _lines(4, "slow-echo"), window="2s")
    expected = {
        completed.id: "batch.completed",
        failed.id: "batch.failed",
        cancelled.id: "batch.cancelled",
        expired.id: "batch.expired",
    }
    for batch_id, event_type in expected.items():
        assert wait_for_batch(client, batch_id).status == event_type.removeprefix("batch.")

    events = receiver.events("/all", S_ALL, 4)
    assert {batch_id: e.type for batch_id, e in events.items()} == expected
    # events = ["batch.failed"]: only the failure; projects = ["team-b"]: nothing of team-a.
    failures = receiver.events("/failed", S_FAILED, 1)
    assert {b: e.type for b, e in failures.items()} == {failed.id: "batch.failed"}
    headers, body, _ = receiver.at("/all")[0]
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.unwrap(body, headers, secret=S_FAILED)  # another endpoint's secret
    # One event per batch, and the same event (same id, same body) at every endpoint.
    assert events[failed.id].id == failures[failed.id].id
    time.sleep(1)
    assert not any(json.loads(b)["data"]["id"] in expected for _, b, _ in receiver.at("/team-b"))
    assert len(receiver.at("/all")) >= 4 and len(receiver.at("/failed")) == 1

    listed = _delivered(hooked, KEYS["team-a"], failed.id, 2)
    assert [d["target"] for d in listed] == ["webhooks[0]", "webhooks[2]"]
    for d in listed:
        assert d["status"] == "delivered" and d["event_type"] == "batch.failed"
        assert [a["status_code"] for a in d["attempts"]] == [200]


def test_a_project_filter_passes_its_own_project(hooked, receiver):
    client = hooked.client(KEYS["team-b"])
    batch = wait_for_batch(client, _submit(client, _lines(2)).id)
    mine = receiver.events("/team-b", S_TEAM_B, 1)
    assert mine[batch.id].type == "batch.completed"
    assert receiver.events("/all", S_ALL, 5)[batch.id].type == "batch.completed"


def test_a_failing_receiver_gets_the_fourth_attempt_with_the_same_id(hooked, receiver):
    receiver.failures["/flaky"] = 3
    client = hooked.client(KEYS["flaky"])
    batch = wait_for_batch(client, _submit(client, _lines(2)).id)
    got = receiver.wait("/flaky", 4)
    assert [status for _, _, status in got] == [500, 500, 500, 200]
    assert len({h["webhook-id"] for h, _, _ in got}) == 1
    assert len({b for _, b, _ in got}) == 1  # the same body every time
    for headers, body, _ in got:  # every attempt is signed, with its own timestamp
        assert SDK.webhooks.unwrap(body, headers, secret=S_FLAKY).data.id == batch.id

    listed = _delivered(hooked, KEYS["flaky"], batch.id, 2)
    [delivery] = [d for d in listed if d["target"] == "webhooks[3]"]
    assert delivery["status"] == "delivered" and delivery["id"] == got[0][0]["webhook-id"]
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 500, 200]
    assert [a["error"] for a in delivery["attempts"]][:3] == ["HTTP 500: no"] * 3
    assert delivery["attempts"][-1]["error"] is None
    assert delivery["last_status"] == 200 and delivery["delivered_at"] is not None


def test_per_batch_url_only_on_allowed_hosts(hooked, receiver):
    client = hooked.client(KEYS["team-a"])
    refused = [
        "https://evil.example.net/hook",
        receiver.url("/mine"),  # 127.0.0.1: an IP literal, not listed
        f"http://user@localhost:{receiver.port}/mine",
        f"ftp://localhost:{receiver.port}/mine",
        "not a url",
    ]
    for url in refused:
        with pytest.raises(openai.BadRequestError) as err:
            _submit(client, _lines(1), webhook_url=url)
        assert err.value.status_code == 400
        assert err.value.body["param"] == "webhook_url", url  # type: ignore[index]

    url = receiver.url("/mine", host="localhost")
    batch = _submit(client, _lines(2), webhook_url=url)
    assert batch.model_extra["lowtide"]["webhook_url"] == url
    assert wait_for_batch(client, batch.id).model_extra["lowtide"]["webhook_url"] == url
    events = receiver.events("/mine", S_BATCH, 1)
    assert events[batch.id].type == "batch.completed"
    listed = _delivered(hooked, KEYS["team-a"], batch.id, 2)
    assert [(d["target"], d["url"]) for d in listed] == [
        ("batch", url),
        ("webhooks[0]", receiver.url("/all")),
    ]


def test_deliveries_are_listed_resent_and_private(hooked, receiver):
    client = hooked.client(KEYS["team-b"])
    batch = wait_for_batch(client, _submit(client, _lines(1)).id)
    data = _delivered(hooked, KEYS["team-b"], batch.id, 2)
    assert [d["target"] for d in data] == ["webhooks[0]", "webhooks[1]"]
    [mine] = [d for d in data if d["target"] == "webhooks[1]"]
    assert mine["url"] == receiver.url("/team-b") and len(mine["attempts"]) == 1
    assert mine["next_attempt_at"] is None

    before = len(receiver.at("/team-b"))
    resend = f"{hooked.base_url}/batches/{batch.id}/webhook_deliveries/{mine['id']}/resend"
    answer = httpx.post(resend, headers={"Authorization": f"Bearer {KEYS['team-b']}"})
    assert answer.status_code == 200 and answer.json()["status"] == "pending"
    got = receiver.wait("/team-b", before + 1)
    assert got[-1][0]["webhook-id"] == mine["id"]
    assert SDK.webhooks.unwrap(got[-1][1], got[-1][0], secret=S_TEAM_B).data.id == batch.id

    # Another project sees neither the deliveries nor the resend.
    other = {"Authorization": f"Bearer {KEYS['team-a']}"}
    assert _deliveries(hooked, KEYS["team-a"], batch.id).status_code == 404
    assert httpx.post(resend, headers=other).status_code == 404
    unknown = resend.replace(mine["id"], "msg_nope")
    assert (
        httpx.post(unknown, headers={"Authorization": f"Bearer {KEYS['team-b']}"}).status_code
        == 404
    )


def test_a_server_killed_before_delivering_delivers_after_restart(make_server, receiver):
    extra = f"""
[[webhooks]]
url = "{receiver.url("/crash")}"
secret = "{S_CRASH}"
"""
    srv = make_server(_config(receiver, extra), name="crash")
    srv.start(env={"LOWTIDE_FAILPOINTS": "webhook_before_delivery"})
    client = srv.client(KEYS["team-a"])
    batch = _submit(client, _lines(3))
    assert srv.proc is not None
    assert srv.proc.wait(timeout=60) == -9  # killed itself with the delivery claimed
    assert receiver.at("/crash") == []

    srv.start()
    assert client.batches.retrieve(batch.id).status == "completed"
    events = receiver.events("/crash", S_CRASH, 1)
    assert events[batch.id].type == "batch.completed"
    assert len(receiver.at("/crash")) == 1


def test_a_receiver_down_past_the_retry_window_fails_the_delivery(make_server, receiver):
    receiver.failures["/down"] = 1000
    extra = f"""
[[webhooks]]
url = "{receiver.url("/down")}"
secret = "{S_CRASH}"
"""
    config = _config(receiver, extra).replace(
        "[worker]\n", "[worker]\nwebhook_retry_window_seconds = 1.5\n", 1
    )
    srv = make_server(config, name="down").start()
    client = srv.client(KEYS["team-a"])
    batch = wait_for_batch(client, _submit(client, _lines(1)).id)
    deadline = time.monotonic() + 20
    found: list[dict] = []
    while time.monotonic() < deadline:
        # The delivery may not be listed yet when the batch is first seen ended.
        found = [
            d
            for d in _deliveries(srv, KEYS["team-a"], batch.id).json()["data"]
            if d["url"].endswith("/down")
        ]
        if found and found[0]["status"] != "pending":
            break
        time.sleep(0.1)
    [down] = found
    assert down["status"] == "failed" and down["next_attempt_at"] is None
    assert len(down["attempts"]) >= 2 and down["last_status"] == 500
    assert {a["status_code"] for a in down["attempts"]} == {500}
    assert len(receiver.at("/down")) == len(down["attempts"])


def test_secrets_and_policy_are_checked_at_load():
    ok = {"url": "https://hooks.example.com/lowtide", "secret": S_ALL}
    Config.model_validate({"webhooks": [ok]})
    for bad in ("s3cr3t", "whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError, match="secret"):
            Config.model_validate({"webhooks": [{**ok, "secret": bad}]})
    with pytest.raises(ValueError, match="https://"):
        Config.model_validate({"webhooks": [{**ok, "url": "ftp://hooks.example.com/"}]})
    with pytest.raises(ValueError):
        Config.model_validate({"webhooks": [{**ok, "events": ["batch.started"]}]})
    with pytest.raises(ValueError, match="needs a secret"):
        Config.model_validate({"batch_webhooks": {"allowed_hosts": ["example.com"]}})

    policy = Config.model_validate(
        {"batch_webhooks": {"secret": S_BATCH, "allowed_hosts": ["*.Example.com", "10.0.0.7"]}}
    ).batch_webhooks
    assert policy.url_problem("https://hooks.example.com/x") is None
    assert policy.url_problem("https://a.b.EXAMPLE.com:8443/x?y=1") is None
    assert policy.url_problem("http://10.0.0.7/x") is None
    for url in (
        "https://example.com/x",  # the domain itself is not a subdomain
        "https://example.com.evil.net/x",
        "https://evilexample.com/x",
        "https://u:p@hooks.example.com/x",
        "http://10.0.0.8/x",
        "http://[::1]/x",
        "file:///etc/passwd",
    ):
        assert policy.url_problem(url) is not None, url
    assert Config().batch_webhooks.url_problem("https://hooks.example.com/x") is not None

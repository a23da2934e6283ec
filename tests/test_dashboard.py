"""The web dashboard in a real browser (headless Chromium through Selenium): live progress,
cancel, login, project isolation, files; a screenshot of each page in test-artifacts/."""

from __future__ import annotations

import io
import os
import shutil
import time

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from support import (
    ROOT,
    LowtideServer,
    chat_line,
    jsonl,
    make_config,
    start_sim,
    stop_process,
    wait_for_batch,
)
from support import submit_batch as _submit

from lowtide.dashboard.session import Sessions

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SHOTS = ROOT / "test-artifacts" / "screenshots"

AUTH = """
[auth]
api_keys = [{ key = "sk-dash-a", project = "team-a" }, { key = "sk-dash-b", project = "team-b" }]
"""


def _models(sim_url: str) -> str:
    # Four at a time at 150 ms a request: about 25 lines a second, so a batch of a few hundred
    # lines runs long enough to watch (and to cancel).
    return f"""
[[models]]
name = "sim-model"
engine = "openai"
base_url = "{sim_url}"
max_concurrency = 4
initial_concurrency = 4
timeout = 5
max_retries = 8

[[models]]
name = "lowtide-echo"
engine = "echo"
"""


@pytest.fixture(scope="module")
def slow_sim():
    proc, url = start_sim("--latency-ms", "150", "--rate-429", "0.02")
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def dash(slow_sim, tmp_path_factory):
    srv = LowtideServer(
        tmp_path_factory.mktemp("dashboard") / "data",
        make_config(models=_models(slow_sim), extra=AUTH),
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("needs chromium and chromedriver (Debian: chromium chromium-driver)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _ui(server: LowtideServer, path: str = "") -> str:
    return f"http://127.0.0.1:{server.port}/ui{path}"


def _shot(driver, name: str, width: int = 1280) -> None:
    """A full-page screenshot at `width` CSS pixels: test-artifacts/screenshots/NAME.png."""
    import base64

    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": max(height, 300), "deviceScaleFactor": 1, "mobile": width < 600},
    )
    time.sleep(0.3)  # layout at the new width
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": max(height, 300), "deviceScaleFactor": 1, "mobile": width < 600},
    )
    data = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})["data"]
    (SHOTS / f"{name}.png").write_bytes(base64.b64decode(data))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _wait(driver, condition, timeout: float = 20):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def _text(driver, css: str) -> str:
    """The element's rendered text, read in one step (htmx may swap it at any moment)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : '';", css
    )


def _accept_confirm(driver) -> None:
    def alert(d):
        try:
            return d.switch_to.alert
        except NoAlertPresentException:
            return False

    _wait(driver, alert, 5).accept()


def _csp_violations(driver) -> list[str]:
    return [
        e["message"]
        for e in driver.get_log("browser")
        if "Content Security Policy" in e["message"] or "Refused to" in e["message"]
    ]


def _login(driver, server: LowtideServer, key: str) -> None:
    driver.get(_ui(server, "/login"))
    box = driver.find_element(By.ID, "api_key")
    box.clear()
    box.send_keys(key)
    driver.find_element(By.ID, "login-button").click()


def _upload(client, name: str, lines: list[dict]):
    return client.files.create(file=(name, io.BytesIO(jsonl(lines))), purpose="batch")


def test_dashboard_end_to_end(dash, browser):
    a, b = dash.client("sk-dash-a"), dash.client("sk-dash-b")
    # Another project's batch: never shown to team-a, by list or by URL.
    theirs = _submit(b, [chat_line(f"b-{i}", "hi", model="lowtide-echo") for i in range(3)])
    wait_for_batch(b, theirs.id)
    their_file = _upload(b, "theirs.jsonl", [chat_line("t", "x", model="lowtide-echo")])
    # team-a: a batch that ends with errors, one that fails validation, one that runs long.
    mixed = [chat_line(f"ok-{i}", f"q {i}") for i in range(12)]
    mixed += [chat_line(f"bad-{i}", "rejected", sim_fault=400) for i in range(4)]
    with_errors = _submit(a, mixed, metadata={"team": "search", "run": "nightly"})
    invalid = _submit(
        a,
        [
            chat_line("v-1", "x"),
            chat_line("v-2", "x", model="no-such-model"),
            chat_line("v-3", "y", model="nope"),
        ],
    )
    wait_for_batch(a, with_errors.id)
    wait_for_batch(a, invalid.id)
    running = _submit(a, [chat_line(f"r-{i}", f"line {i}") for i in range(400)])

    # -- login is required, and only a valid key gets in ----------------------------------
    browser.get(_ui(dash, "/batches"))
    _wait(browser, lambda d: "/ui/login" in d.current_url)
    _shot(browser, "login")
    _login(browser, dash, "sk-wrong")
    # The answer to the POST replaces the page: wait for it rather than read the old one.
    _wait(browser, lambda d: "not valid" in _text(d, "#login-error"))
    assert httpx.get(_ui(dash, "/batches"), follow_redirects=False).status_code == 303
    _login(browser, dash, "sk-dash-a")
    _wait(browser, lambda d: d.current_url.endswith("/ui/batches"))
    assert _text(browser, "#project") == "team-a"
    cookie = browser.get_cookie("lowtide_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert "sk-dash-a" not in cookie["value"]
    assert browser.execute_script("return document.cookie") == ""  # nothing readable from JS

    # -- the batches page: live progress without a reload ---------------------------------
    row = f'tr[data-id="{running.id}"]'
    _wait(browser, lambda d: _text(d, f"{row} .total") == "400")
    browser.execute_script("window.__same_page = true")
    seen: list[int] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(set(seen)) < 3:
        done = _text(browser, f"{row} .done")
        if done.isdigit() and (not seen or int(done) != seen[-1]):
            seen.append(int(done))
        time.sleep(0.2)
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen
    assert 0 < seen[-1] < 400
    assert browser.execute_script("return window.__same_page") is True  # htmx, not a reload
    value = float(browser.execute_script(f"return document.querySelector('{row} progress').value"))
    assert 0 < value < 100
    source = browser.page_source
    assert with_errors.id in source and invalid.id in source
    assert theirs.id not in source
    _shot(browser, "batches")

    # The status filter.
    browser.get(_ui(dash, "/batches?status=failed"))
    assert invalid.id in browser.page_source and running.id not in browser.page_source
    browser.get(_ui(dash, "/batches"))

    # -- one running batch: live counts, then cancel from its page -------------------------
    browser.find_element(By.CSS_SELECTOR, f'{row} a[href$="{running.id}"]').click()
    _wait(browser, lambda d: _text(d, "#batch-id") == running.id)
    assert _text(browser, "#batch-status") == "in progress"
    first = int(_text(browser, "#batch-done"))
    _wait(browser, lambda d: int(_text(d, "#batch-done") or 0) > first, 15)
    assert "Results so far" in _text(browser, "#downloads")
    _shot(browser, "batch-running")
    browser.find_element(By.ID, "cancel-button").click()
    _accept_confirm(browser)
    _wait(browser, lambda d: "Cancel requested" in _text(d, "#notice"))
    _wait(browser, lambda d: _text(d, "#batch-status") == "cancelled", 30)
    assert a.batches.retrieve(running.id).status == "cancelled"
    _wait(browser, lambda d: d.find_elements(By.ID, "retry-button"))
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#batch-errors details"), 15)
    codes = [
        e.get_attribute("data-code")
        for e in browser.find_elements(By.CSS_SELECTOR, "#batch-errors details")
    ]
    assert "batch_cancelled" in codes, codes
    _shot(browser, "batch-cancelled")

    # -- a batch with failed lines: errors grouped by code, download links ----------------
    browser.get(_ui(dash, f"/batches/{with_errors.id}"))
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#batch-errors details"))
    group = browser.find_element(By.CSS_SELECTOR, '#batch-errors details[data-code="sim_fault"]')
    assert "4 lines" in group.text and "bad-0" in group.text
    timeline = _text(browser, "#timeline")
    for stamp in ("created", "in progress", "finalizing", "completed", "expires"):
        assert stamp in timeline.lower(), timeline
    links = {
        e.get_attribute("id"): e.get_attribute("href")
        for e in browser.find_elements(By.CSS_SELECTOR, "#downloads a[id]")
    }
    jar = {"lowtide_session": cookie["value"]}
    out = httpx.get(links["download-output"], cookies=jar)
    assert out.status_code == 200 and out.text.count("\n") == 12
    err = httpx.get(links["download-error"], cookies=jar)
    assert err.status_code == 200 and err.text.count("\n") == 4
    assert httpx.get(links["download-output"]).status_code == 303  # no cookie: login first
    _shot(browser, "batch-errors")

    browser.get(_ui(dash, f"/batches/{invalid.id}"))
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#batch-errors details"))
    validation = _text(browser, "#batch-errors")
    assert "model_not_found" in validation and "Validation errors" in validation
    _shot(browser, "batch-validation")

    # -- another project's batch and file, by direct URL -----------------------------------
    for path in (
        f"/batches/{theirs.id}",
        f"/batches/{theirs.id}/download/output",
        f"/files/{their_file.id}/download",
    ):
        browser.get(_ui(dash, path))
        assert "Not found" in browser.title, path
        assert theirs.id not in _text(browser, "main") or "No batch found" in _text(browser, "main")
    r = httpx.get(_ui(dash, f"/batches/{theirs.id}"), cookies=jar)
    assert r.status_code == 404 and "team-b" not in r.text

    # -- the /v1 API is as strict as before: the cookie is no key ---------------------------
    assert httpx.get(f"{dash.base_url}/batches", cookies=jar).status_code == 401

    # -- every POST needs the session's CSRF token, from our own origin --------------------
    cancel = _ui(dash, f"/batches/{with_errors.id}/retry")
    assert httpx.post(cancel, cookies=jar, data={"csrf": "forged"}).status_code == 403
    token = browser.find_element(By.CSS_SELECTOR, 'input[name="csrf"]').get_attribute("value")
    evil = {"origin": "http://evil.example"}
    assert httpx.post(cancel, cookies=jar, data={"csrf": token}, headers=evil).status_code == 403
    assert httpx.post(cancel, data={"csrf": token}).status_code == 303  # no cookie: to login
    assert a.batches.retrieve(with_errors.id).status == "completed"  # none of them retried

    # -- routes: live numbers from the worker, workers, and the chart ---------------------
    again = _submit(a, [chat_line(f"g-{i}", f"again {i}") for i in range(150)])
    browser.get(_ui(dash, "/routes"))
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-route="sim-model"]'))
    _wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, f'#workers-table a[href$="{again.id}"]'),
        20,
    )
    route = _text(browser, 'tr[data-route="sim-model"]')
    assert "(max 4, adaptive)" in route, route
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-tokens .uplot"), 20)
    assert theirs.id not in browser.page_source
    _shot(browser, "routes")
    wait_for_batch(a, again.id)

    # -- files: listed with size and purpose, deleted from the page ------------------------
    doomed = _upload(a, "delete-me.jsonl", [chat_line("d", "x")])
    browser.get(_ui(dash, "/files"))
    files_row = f'tr[data-id="{doomed.id}"]'
    assert "delete-me.jsonl" in _text(browser, files_row) and "batch" in _text(browser, files_row)
    assert with_errors.input_file_id in browser.page_source
    assert their_file.id not in browser.page_source
    _shot(browser, "files")
    browser.find_element(By.CSS_SELECTOR, f"{files_row} button.delete").click()
    _accept_confirm(browser)
    _wait(browser, lambda d: "File deleted" in _text(d, "#notice"))
    assert not browser.find_elements(By.CSS_SELECTOR, files_row)
    with pytest.raises(Exception, match="404|No such"):
        a.files.retrieve(doomed.id)

    # -- a phone-sized screen ---------------------------------------------------------------
    browser.get(_ui(dash, "/batches"))
    _shot(browser, "batches-phone", width=390)
    browser.get(_ui(dash, f"/batches/{with_errors.id}"))
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#batch-errors details"))
    _shot(browser, "batch-phone", width=390)

    # No page broke its own Content-Security-Policy (no inline script or style).
    assert _csp_violations(browser) == []

    # Logging out ends the session in this browser.
    browser.find_element(By.CSS_SELECTOR, "header form button").click()
    _wait(browser, lambda d: "/ui/login" in d.current_url)
    browser.get(_ui(dash, "/files"))
    _wait(browser, lambda d: "/ui/login" in d.current_url)


def test_dashboard_without_auth_needs_no_login(make_server, sim_url, browser):
    server = make_server(make_config(sim_url), name="open").start()
    client = server.client()
    f = _upload(client, "open.jsonl", [chat_line("o", "x", model="lowtide-echo")])
    browser.delete_all_cookies()
    browser.get(f"http://127.0.0.1:{server.port}/")
    _wait(browser, lambda d: d.current_url.endswith("/ui/batches"))
    assert _text(browser, "#project") == "default"
    assert not browser.find_elements(By.CSS_SELECTOR, "header form")  # nothing to log out of
    browser.get(_ui(server, "/files"))
    assert f.id in browser.page_source
    browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{f.id}"] button.delete').click()
    _accept_confirm(browser)
    _wait(browser, lambda d: "File deleted" in _text(d, "#notice"))
    # Even without keys, a POST from elsewhere (no session, no token) changes nothing.
    assert httpx.post(_ui(server, f"/files/{f.id}/delete"), data={}).status_code == 403


# -- sessions, without a browser ------------------------------------------------------------
def test_session_cookies_cannot_be_forged_or_outlive_their_key():
    import base64

    import orjson

    sessions = Sessions({"sk-one": "p1", "sk-two": "p2"})
    cookie = sessions.issue("sk-one")
    session = sessions.read(cookie)
    assert session is not None and session.project == "p1" and session.authenticated
    assert "sk-one" not in cookie
    assert sessions.read(cookie).csrf == session.csrf  # stable for the session
    assert sessions.read(sessions.issue("sk-one")).csrf != session.csrf  # new per session
    # Another project in the payload, under the same signature: refused.
    body, signature = cookie.split(".")
    payload = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    forged = base64.urlsafe_b64encode(orjson.dumps({**payload, "p": "p2"})).rstrip(b"=").decode()
    assert sessions.read(f"{forged}.{signature}") is None
    # Expired, garbage, or the anonymous kind while keys are configured: refused.
    late = base64.urlsafe_b64encode(orjson.dumps({**payload, "e": 1})).rstrip(b"=").decode()
    assert sessions.read(f"{late}.{signature}") is None
    for junk in ("", "x", "a.b", "a.b.c", "." * 5, "é.é"):
        assert sessions.read(junk) is None
    assert sessions.read(Sessions({}).issue(None)) is None
    # The key is removed from the configuration: its sessions end with it.
    assert Sessions({"sk-two": "p2"}).read(cookie) is None
    # Another process with the same keys accepts it (no shared secret to store).
    assert Sessions({"sk-one": "p1", "sk-two": "p2"}).read(cookie) is not None
    # Without keys: an anonymous session of the default project, for the CSRF token only.
    open_ = Sessions({})
    anon = open_.read(open_.issue(None))
    assert anon is not None and anon.project == "default" and not anon.authenticated
    assert open_.project_of_key("anything") is None
    assert sessions.project_of_key("sk-two") == "p2" and sessions.project_of_key("sk-t") is None


def test_route_history_is_bounded_and_gives_rates_per_step():
    from lowtide.admission.controller import RouteController
    from lowtide.admission.snapshot import RouteWatch
    from lowtide.config import ModelRoute

    route = ModelRoute(name="dash-history", engine="echo")
    controller = RouteController(route)
    watch = RouteWatch(lambda: {route.name: controller}, [route], step=5, span=60)
    for i in range(40):  # 200 s of samples, 60 s kept
        controller.tokens += 50
        controller.count("200")
        watch.sample(1000.0 + 5 * i)
    history = watch.history()
    assert len(history["times"]) == 12 and history["times"][-1] == 1195.0
    assert history["tokens"][route.name] == [10.0] * 12  # 50 tokens every 5 s
    assert history["requests"][route.name] == [0.2] * 12
    (row,) = watch.snapshot()
    assert row["name"] == route.name and row["active"] and row["window_max"] == 64

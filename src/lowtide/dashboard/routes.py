"""The dashboard's pages: batches, one batch, routes and workers, files; login and logout.

A face like the API: it calls the runtime's services and nothing below them. Pages are rendered
on the server (Jinja2); the live parts are fragments that htmx polls. Every project-scoped read
goes through the service with the session's project, so another project's batch or file is a
404 here exactly as in the API.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from lowtide.dashboard import views
from lowtide.dashboard.session import COOKIE, SESSION_SECONDS, Session, Sessions
from lowtide.errors import ApiError
from lowtide.service import BatchService, FileService, RerunRequest

PREFIX = "/ui"
HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50  # batches a page shows
SCAN_LIMIT = 1000  # batches looked at to fill a filtered page
FILES_PAGE = 100

templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters.update(
    time=views.fmt_time,
    duration=views.fmt_duration,
    bytes=views.fmt_bytes,
    num=views.fmt_num,
    money=views.fmt_money,
)

# No inline script or style, no other origin, no framing: a page can only talk to this server.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "object-src 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

router = APIRouter(include_in_schema=False)


class _NeedLogin(Exception):
    pass


class _BadCsrf(Exception):
    pass


def install(app: FastAPI) -> None:
    """Serve the dashboard at / and /ui/ on `app` (the API stays under /v1)."""
    keys = {k.key: k.project for k in app.state.runtime.config.auth.api_keys}
    app.state.dashboard_sessions = Sessions(keys)
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.add_exception_handler(_NeedLogin, _need_login)
    app.add_exception_handler(_BadCsrf, _bad_csrf)


# -- sessions ---------------------------------------------------------------------------------
def _sessions(request: Request) -> Sessions:
    return request.app.state.dashboard_sessions


def _session(request: Request) -> Session:
    """The caller's session; without auth, a new anonymous one if it has none (or a stale one)."""
    sessions = _sessions(request)
    session = sessions.read(request.cookies.get(COOKIE))
    if session is not None:
        return session
    if sessions.auth:
        raise _NeedLogin()
    cookie = sessions.issue(None)
    request.state.new_cookie = cookie
    session = sessions.read(cookie)
    assert session is not None
    return session


def _same_origin(request: Request) -> bool:
    """A POST from one of our own pages: no cross-site fetch, and an Origin (if any) that is us."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser that sends one; the CSRF token still has to match
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def _post_session(request: Request) -> Session:
    """The session of a POST, after its CSRF token (form field or X-CSRF-Token) is checked."""
    if not _same_origin(request):
        raise _BadCsrf()
    session = _session(request)
    token = request.headers.get("x-csrf-token")
    if token is None:
        token = (await request.form()).get("csrf")
    if not isinstance(token, str) or not hmac.compare_digest(token.encode(), session.csrf.encode()):
        raise _BadCsrf()
    return session


def _htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


async def _need_login(request: Request, _exc: Exception) -> Response:
    target = f"{PREFIX}/login?next={quote(_here(request), safe='')}"
    if _htmx(request):
        return Response(status_code=200, headers={"hx-redirect": target})
    response = RedirectResponse(target, status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


async def _bad_csrf(request: Request, _exc: Exception) -> Response:
    return _render(
        request,
        "message.html",
        {
            "title": "Form expired",
            "message": "This form was not sent from a current dashboard page. Reload the page "
            "and try again.",
        },
        None,
        status=403,
    )


def _here(request: Request) -> str:
    """Where to come back to after the login: the page (not the fragment) the caller was on."""
    if _htmx(request):
        url = urlsplit(request.headers.get("hx-current-url", ""))
        return url.path + (f"?{url.query}" if url.query else "")
    if request.method == "GET":
        return request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"{PREFIX}/batches"


def _safe_next(target: str | None) -> str:
    """Only a path of the dashboard itself: never another site."""
    if not target or not target.startswith(f"{PREFIX}/") or target.startswith("//"):
        return f"{PREFIX}/batches"
    if "\\" in target or any(ord(c) < 32 for c in target):
        return f"{PREFIX}/batches"
    return target


# -- rendering ------------------------------------------------------------------------------
def _finish(request: Request, response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    cookie = getattr(request.state, "new_cookie", None)
    if cookie is not None:
        _set_cookie(request, response, cookie)
    return response


def _set_cookie(request: Request, response: Response, value: str) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def _render(
    request: Request,
    template: str,
    context: dict[str, Any],
    session: Session | None,
    *,
    status: int = 200,
) -> Response:
    sessions = _sessions(request)
    response = templates.TemplateResponse(
        request,
        template,
        {
            **context,
            "session": session,
            "auth": sessions.auth,
            "prefix": PREFIX,
            "htmx_config": '{"includeIndicatorStyles": false, "allowEval": false}',
        },
        status_code=status,
    )
    return _finish(request, response)


def _not_found(request: Request, session: Session, message: str) -> Response:
    return _render(
        request, "message.html", {"title": "Not found", "message": message}, session, status=404
    )


def _batches(request: Request) -> BatchService:
    return request.app.state.runtime.batches


def _files(request: Request) -> FileService:
    return request.app.state.runtime.files


# -- login ----------------------------------------------------------------------------------
@router.get("/")
async def root() -> Response:
    return RedirectResponse(f"{PREFIX}/batches", status_code=303)


@router.get(PREFIX)
@router.get(f"{PREFIX}/")
async def ui_root() -> Response:
    return RedirectResponse(f"{PREFIX}/batches", status_code=303)


@router.get(f"{PREFIX}/login")
async def login_page(request: Request, next: str | None = None) -> Response:
    sessions = _sessions(request)
    if not sessions.auth:
        return RedirectResponse(f"{PREFIX}/batches", status_code=303)
    if sessions.read(request.cookies.get(COOKIE)) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _render(request, "login.html", {"next": _safe_next(next), "error": None}, None)


@router.post(f"{PREFIX}/login")
async def login(request: Request) -> Response:
    sessions = _sessions(request)
    if not sessions.auth:
        return RedirectResponse(f"{PREFIX}/batches", status_code=303)
    if not _same_origin(request):
        raise _BadCsrf()
    form = await request.form()
    key, target = form.get("api_key"), form.get("next")
    target = _safe_next(target if isinstance(target, str) else None)
    project = sessions.project_of_key(key.strip()) if isinstance(key, str) and key.strip() else None
    if project is None or not isinstance(key, str):
        context = {"next": target, "error": "That API key is not valid."}
        return _render(request, "login.html", context, None, status=401)
    response = RedirectResponse(target, status_code=303)
    _set_cookie(request, response, sessions.issue(key.strip()))
    return _finish(request, response)


@router.post(f"{PREFIX}/logout")
async def logout(request: Request) -> Response:
    await _post_session(request)
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return _finish(request, response)


# -- batches --------------------------------------------------------------------------------
async def _batch_page(
    request: Request, project: str, status: str, after: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to PAGE_SIZE of the project's batches with `status`, newest first, and the cursor of
    the next page (None: no more). A filter looks at SCAN_LIMIT batches at most per page."""
    service = _batches(request)
    found: list[dict[str, Any]] = []
    cursor, scanned, more = after, 0, True
    while more and len(found) < PAGE_SIZE and scanned < SCAN_LIMIT:
        views_, more = await service.list(project, after=cursor, limit=100)
        for i, view in enumerate(views_):
            scanned += 1
            cursor = view.row.id
            if views.matches(view, status):
                found.append(views.batch_summary(view))
                if len(found) >= PAGE_SIZE:
                    more = more or i + 1 < len(views_)
                    break
        if not views_:
            more = False
    return found, cursor if more else None


def _status_of(status: str | None) -> str:
    return status if status in views.STATUS_FILTERS else "all"


@router.get(f"{PREFIX}/batches")
async def batches_page(
    request: Request, status: str | None = None, after: str | None = None
) -> Response:
    session = _session(request)
    status = _status_of(status)
    rows, next_after = await _batch_page(request, session.project, status, after)
    context = {
        "nav": "batches",
        "rows": rows,
        "status": status,
        "statuses": views.STATUS_FILTERS,
        "after": after,
        "next_after": next_after,
    }
    return _render(request, "batches.html", context, session)


@router.get(f"{PREFIX}/batches/rows")
async def batches_rows(
    request: Request, status: str | None = None, after: str | None = None
) -> Response:
    session = _session(request)
    status = _status_of(status)
    rows, _ = await _batch_page(request, session.project, status, after)
    context = {"rows": rows, "status": status, "after": after}
    return _render(request, "_batch_rows.html", context, session)


async def _batch_or_404(request: Request, session: Session, batch_id: str) -> Any:
    try:
        return await _batches(request).get(session.project, batch_id)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


@router.get(f"{PREFIX}/batches/{{batch_id}}")
async def batch_page(request: Request, batch_id: str, notice: str | None = None) -> Response:
    session = _session(request)
    view = await _batch_or_404(request, session, batch_id)
    if view is None:
        return _not_found(request, session, f"No batch found with id '{batch_id}'.")
    context = {
        "nav": "batches",
        "b": views.batch_summary(view),
        "notice": _NOTICES.get(notice or ""),
        "problem": None,
    }
    return _render(request, "batch.html", context, session)


@router.get(f"{PREFIX}/batches/{{batch_id}}/live")
async def batch_live(request: Request, batch_id: str) -> Response:
    session = _session(request)
    view = await _batch_or_404(request, session, batch_id)
    if view is None:
        return _not_found(request, session, f"No batch found with id '{batch_id}'.")
    return _render(request, "_batch_live.html", {"b": views.batch_summary(view)}, session)


@router.get(f"{PREFIX}/batches/{{batch_id}}/errors")
async def batch_errors(request: Request, batch_id: str) -> Response:
    session = _session(request)
    view = await _batch_or_404(request, session, batch_id)
    if view is None:
        return _not_found(request, session, f"No batch found with id '{batch_id}'.")
    report = views.validation_errors(view.row.errors)
    file_report = None
    if view.counts.failed or view.row.error_file_id:
        file_report = await views.error_file_groups(_batches(request), session.project, view)
    context = {
        "b": views.batch_summary(view),
        "reports": [r for r in (report, file_report) if r is not None],
        "max_lines": views.ERROR_LINES_READ,
    }
    return _render(request, "_batch_errors.html", context, session)


_NOTICES = {
    "cancelled": "Cancel requested: lines already sent may still finish.",
    "retried": "Retry started: the lines that did not succeed run again.",
    "deleted": "File deleted.",
}


async def _batch_action(request: Request, batch_id: str, action: str) -> Response:
    session = await _post_session(request)
    service = _batches(request)
    try:
        if action == "cancel":
            await service.cancel(session.project, batch_id)
        else:
            await service.retry(session.project, batch_id, RerunRequest(), None)
    except ApiError as exc:
        view = await _batch_or_404(request, session, batch_id)
        if view is None:
            return _not_found(request, session, f"No batch found with id '{batch_id}'.")
        context = {
            "nav": "batches",
            "b": views.batch_summary(view),
            "notice": None,
            "problem": exc.message,
        }
        return _render(request, "batch.html", context, session, status=exc.status)
    notice = "cancelled" if action == "cancel" else "retried"
    return RedirectResponse(
        f"{PREFIX}/batches/{quote(batch_id, safe='')}?notice={notice}", status_code=303
    )


@router.post(f"{PREFIX}/batches/{{batch_id}}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> Response:
    return await _batch_action(request, batch_id, "cancel")


@router.post(f"{PREFIX}/batches/{{batch_id}}/retry")
async def retry_batch(request: Request, batch_id: str) -> Response:
    return await _batch_action(request, batch_id, "retry")


@router.get(f"{PREFIX}/batches/{{batch_id}}/download/{{kind}}")
async def download(request: Request, batch_id: str, kind: str) -> Response:
    """The batch's input, output or error file, or its results so far ("partial")."""
    session = _session(request)
    view = await _batch_or_404(request, session, batch_id)
    if view is None:
        return _not_found(request, session, f"No batch found with id '{batch_id}'.")
    file_id = {
        "input": view.row.input_file_id,
        "output": view.row.output_file_id,
        "error": view.row.error_file_id,
    }.get(kind)
    try:
        if kind == "partial":
            chunks = await _batches(request).results(
                session.project, batch_id, output=True, errors=True
            )
            name = f"{batch_id}_results_so_far.jsonl"
            return _finish(request, _attachment(chunks, name, None))
        if file_id:
            return await _file_download(request, session, file_id)
    except ApiError as exc:
        return _not_found(request, session, exc.message)
    return _not_found(request, session, f"Batch '{batch_id}' has no {kind} file.")


async def _file_download(request: Request, session: Session, file_id: str) -> Response:
    row, chunks = await _files(request).content(session.project, file_id)
    return _finish(request, _attachment(chunks, row.filename, row.bytes))


def _attachment(chunks: Any, filename: str, size: int | None) -> StreamingResponse:
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename
    )
    headers = {
        "content-disposition": f'attachment; filename="{fallback}"; '
        f"filename*=UTF-8''{quote(filename, safe='')}"
    }
    if size is not None:
        headers["content-length"] = str(size)
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)


# -- routes and workers ---------------------------------------------------------------------
@router.get(f"{PREFIX}/routes")
async def routes_page(request: Request) -> Response:
    session = _session(request)
    context = {"nav": "routes", **await _routes_context(request, session)}
    return _render(request, "routes.html", context, session)


@router.get(f"{PREFIX}/routes/live")
async def routes_live(request: Request) -> Response:
    session = _session(request)
    return _render(request, "_routes_live.html", await _routes_context(request, session), session)


@router.get(f"{PREFIX}/routes/history.json")
async def routes_history(request: Request) -> Response:
    _session(request)
    history = request.app.state.runtime.routes_history() or {
        "step": None,
        "times": [],
        "tokens": {},
        "requests": {},
    }
    return _finish(request, JSONResponse(history))


async def _routes_context(request: Request, session: Session) -> dict[str, Any]:
    runtime = request.app.state.runtime
    return {
        "routes": runtime.routes_snapshot(),
        "problems": runtime.health().get("route_problems", {}),
        "workers": await _batches(request).workers(session.project),
        "this_worker": runtime.worker_id(),
    }


# -- files ----------------------------------------------------------------------------------
@router.get(f"{PREFIX}/files")
async def files_page(
    request: Request, after: str | None = None, notice: str | None = None
) -> Response:
    session = _session(request)
    rows, has_more = await _files(request).list(
        session.project, purpose=None, limit=FILES_PAGE, after=after, ascending=False
    )
    context = {
        "nav": "files",
        "files": rows,
        "next_after": rows[-1].id if has_more and rows else None,
        "after": after,
        "notice": _NOTICES.get(notice or ""),
        "problem": None,
    }
    return _render(request, "files.html", context, session)


@router.post(f"{PREFIX}/files/{{file_id}}/delete")
async def delete_file(request: Request, file_id: str) -> Response:
    session = await _post_session(request)
    try:
        await _files(request).delete(session.project, file_id)
    except ApiError as exc:
        return _not_found(request, session, exc.message)
    return RedirectResponse(f"{PREFIX}/files?notice=deleted", status_code=303)


@router.get(f"{PREFIX}/files/{{file_id}}/download")
async def download_file(request: Request, file_id: str) -> Response:
    session = _session(request)
    try:
        return await _file_download(request, session, file_id)
    except ApiError as exc:
        return _not_found(request, session, exc.message)

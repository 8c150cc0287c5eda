"""The baseline server: what a team writes first, to measure every optimization against.

FastAPI on uvicorn, the PyTorch model in eager mode (fp32), no batching, no cache, one process,
JSON parsed the naive way (the `json` module, then pydantic over the Python objects: exactly
FastAPI's default body parsing). It serves the same FastAPI app as every other server
(serve/http_app.py: same routes, same response shapes, same ranking core); compact JSON and msgpack
bodies are accepted too. `--variant` serves another manifest variant the same naive way.

    python serve/baseline.py [--port 8001] [--variant torch-eager] [--model NAME] [--threads 1]

The optimized plain-uvicorn server (an ONNX variant, the fast parser, optional cache: the reference
that isolates Ray Serve's cost) is serve/uvicorn_server.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python serve/baseline.py` puts serve/ first on sys.path; drop it so `import serve` is our package.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]

import argparse  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from fastapi import FastAPI  # noqa: E402

from serve import uvicorn_server  # noqa: E402
from serve.config import ServiceConfig  # noqa: E402
from serve.encoding import ParseMode  # noqa: E402

BASELINE_VARIANT = "torch-eager"
DEFAULT_PORT = 8001


def create_app(config: ServiceConfig, scorer: Any = None, parse_mode: ParseMode = "naive") -> FastAPI:
    """The baseline app; `scorer` defaults to `load_scorer(config.variant, ...)` (tests pass one)."""
    return uvicorn_server.create_app(config, scorer, parse_mode, title="rankserve baseline",
                                     description="Naive FastAPI + uvicorn ranking server.")


def parse_args(argv: Sequence[str] | None = None) -> tuple[ServiceConfig, ParseMode]:
    p = argparse.ArgumentParser(description="The baseline ranking server (FastAPI + uvicorn, no Ray): naive "
                                            "JSON parsing, no batching, no cache.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    uvicorn_server.add_server_options(p, variant=BASELINE_VARIANT, port=DEFAULT_PORT)
    options = vars(p.parse_args(argv))
    # inline_max_docs=0: inference in the thread pool, as a FastAPI `def` endpoint runs it; no admission
    # control: a first version queues everything.
    return ServiceConfig(**options, batching=False, cache=False, inline_max_docs=0, admission=False), "naive"


def main(argv: Sequence[str] | None = None) -> int:
    config, parse_mode = parse_args(argv)
    # No heap freeze either: the garbage collector's full passes stay, as in a first version.
    return uvicorn_server.serve_forever(create_app(config, parse_mode=parse_mode), config, freeze_heap=False)


if __name__ == "__main__":
    raise SystemExit(main())

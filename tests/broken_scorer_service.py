"""The real plain-uvicorn ranking service (serve/baseline.py's app, fast parsing) with a scorer that raises.

Fault injection for the load-test tests: every request reaches the real ranking core, whose scoring
call raises, so the service answers its degraded fallback (HTTP 200, `degraded: true`). A load
generator that counted those as successes would call a broken model fast; the tests check that it
does not. `running_broken_service()` starts it in a subprocess on a free loopback port and stops it.

Run by hand: `python tests/broken_scorer_service.py --port 8012`.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

N_FEATURES = 136


class RaisingScorer:
    """A pointwise scorer whose every call fails, as a corrupt model or a failing runtime would."""

    model, variant, version, n_features, pointwise = "broken", "raises", "0", N_FEATURES, True

    def score_documents(self, rows: np.ndarray) -> np.ndarray:
        raise RuntimeError("injected scorer failure")


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from serve.baseline import create_app
    from serve.config import ServiceConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    config = ServiceConfig(variant="onnx-int8-dynamic", cache=False, batching=False, port=args.port)
    app = create_app(config, scorer=RaisingScorer(), parse_mode="fast")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="critical")


@contextlib.contextmanager
def running_broken_service(timeout_s: float = 60.0) -> Iterator[str]:
    """Start it on a free loopback port in a subprocess (loadtest_rank_app.running_server); yield its URL."""
    from loadtest_rank_app import free_port, running_server

    port = free_port()
    with running_server([str(Path(__file__).resolve()), "--port", str(port)], port, timeout_s) as url:
        yield url


if __name__ == "__main__":
    main()

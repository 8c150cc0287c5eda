"""The drift scenario: traffic whose features shift part-way through, and when the service's monitor says so.

One plain-uvicorn server (serve/uvicorn_server.py --drift) answers the test split's queries, sent one
after another for `--seconds`; halfway through, the traffic's values of `SHIFTED` features move (a
mean shift of one training standard deviation for most; one is multiplied by 3, as a change of unit
upstream would). Every
`--poll-s` the runner reads `GET /drift` (serve/drift.py: PSI, KS and the out-of-range share per
feature over the monitor's bounded sample). The report (results/online_eval/<cpu>-<isa>-drift.md,
with a plot) says which features were flagged, when, and whether any unshifted one ever was.

    python loadtest/drift_run.py [--seconds 60] [--poll-s 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.online_users import TestQueries
from models.paths import REPO_ROOT
from serve.drift import DEFAULT_REFERENCE, DriftSettings

RESULTS = REPO_ROOT / "results" / "online_eval"
PORT = 8032
MAX_DOCS = 100
SCALED = 9  # this feature is multiplied by 3; the others in SHIFTED move by one standard deviation
SHIFTED = (4, SCALED, 30, 77, 120)


def shift(std: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The traffic's change at the halfway mark: SCALED multiplied by 3, the other SHIFTED features moved
    by one training standard deviation."""
    def apply(X: np.ndarray) -> np.ndarray:
        for j in SHIFTED:
            if j == SCALED:
                X[:, j] *= 3.0
            else:
                X[:, j] += std[j]
        return X
    return apply


def ensure_reference() -> Path:
    path = REPO_ROOT / DEFAULT_REFERENCE
    if not path.exists():
        import subprocess

        subprocess.run([sys.executable, "serve/drift.py", "reference"], cwd=REPO_ROOT, check=True, timeout=300)
    return path


def run(seconds: float, poll_s: float, settings: DriftSettings, work: Path) -> dict[str, Any]:
    from loadtest.services import UvicornServer
    from loadtest.sweep_config import ServiceSpec
    from models.data import load_dataset
    from models.environment import collect_environment

    ensure_reference()
    data = load_dataset("synthetic")
    std = data.train.X.std(axis=0)
    phases = {shifted: [q.body for q in TestQueries.from_split(data.test, MAX_DOCS, shift(std) if shifted else None).queries]
              for shifted in (False, True)}
    spec = ServiceSpec(server="uvicorn", encoding="msgpack", port=PORT, cache=False, admission=False,
                       model="mlp-ranknet", variant="onnx-int8-dynamic", drift=settings)
    service = UvicornServer(spec).start(work / "drift-server.log", cores=None, redis_url=None, timeout_s=120)
    timeline: list[dict[str, Any]] = []
    sent = failures = 0
    rng = np.random.default_rng(0)
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            start = time.monotonic()
            next_poll = start + poll_s
            shift_at = seconds / 2
            while (now := time.monotonic()) - start < seconds:
                shifted = now - start >= shift_at
                bodies = phases[shifted]
                resp = client.post("/rank", content=bodies[int(rng.integers(len(bodies)))],
                                   headers={"content-type": "application/msgpack"})
                sent += 1
                failures += resp.status_code != 200 or resp.json().get("degraded", False)
                if now >= next_poll:
                    report = client.get("/drift").json()
                    timeline.append({"t": now - start, "shifted": shifted, "rows": report["rows"],
                                     "psi": [f["psi"] for f in report["features"]],
                                     "ks": [f["ks"] for f in report["features"]],
                                     "flagged": report["flagged"]})
                    next_poll += poll_s
    finally:
        service.stop()
    return {"config": {"seconds": seconds, "poll_s": poll_s, "shifted": list(SHIFTED), "scaled": SCALED,
                       "shift_at_s": seconds / 2, "settings": settings.model_dump(), "max_docs": MAX_DOCS},
            "requests": sent, "failures": failures, "timeline": timeline, "environment": collect_environment()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--sample-rate", type=float, default=0.5, help="the monitor's (serve/drift.py)")
    parser.add_argument("--window", type=int, default=DriftSettings().window)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "artifacts" / "online_eval")
    args = parser.parse_args(argv)
    from loadtest.drift_report import write_results

    settings = DriftSettings(sample_rate=args.sample_rate, window=args.window)
    report = run(args.seconds, args.poll_s, settings, args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "drift-report.json").write_text(json.dumps(report))
    print(f"wrote {write_results(report, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

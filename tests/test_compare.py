"""compare.py on two run folders built from typed records (tests/run_folders.py): ratios of the rows'
figures (latency percentiles over the merged histograms), a change flagged only beyond the runs' own
spread, and an SLO maximum shown with its status and compared only when both are a service's limit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from run_folders import entry, latencies, recorder, slo, trial, write_run

from loadtest import compare
from loadtest.records import CONVERGED, GENERATOR_BOUND

# Per entry: (trial medians in ms, requests/s per trial). B: baseline within A's spread, int8 slower, cache faster.
A = {"baseline": ((40.0, 42.0, 45.0), (100.0, 105.0, 110.0)), "int8": ((10.0, 10.5, 11.0), (400.0, 410.0, 420.0)),
     "cache": ((8.0, 8.2, 8.4), (900.0, 910.0, 920.0))}
B = {"baseline": ((41.0, 43.0, 44.0), (101.0, 106.0, 109.0)), "int8": ((15.0, 15.5, 16.0), (300.0, 305.0, 310.0)),
     "cache": ((5.0, 5.1, 5.2), (1200.0, 1210.0, 1220.0))}
SLO_A = {"baseline": (CONVERGED, 60.0, 62.0), "cache": (CONVERGED, 1200.0, 1250.0)}
SLO_B = {"baseline": (GENERATOR_BOUND, 90.0, 95.0), "cache": (CONVERGED, 1500.0, 1560.0)}


def _values(name: str, median: float, index: int) -> list[float]:
    return list(latencies(400, median, seed=10 * list(A).index(name) + index))


def _run(path: Path, spec: dict, slos: dict) -> Path:
    entries = []
    for name, (medians, rates) in spec.items():
        trials = [trial(_values(name, m, i), rps=r, index=i, scenario="cache-mix" if name == "cache" else "steady")
                  for i, (m, r) in enumerate(zip(medians, rates, strict=True))]
        trials += [trial(_values(name, 100.0, i), rps=10.0, list_size=1000, index=i) for i in range(3)]
        searches = [slo(slos[name][0], slos[name][1], cap=slos[name][2])] if name in slos else []
        entries.append(entry(name, trials, searches))
    return write_run(path, entries)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    return _run(root / "run-a", A, SLO_A), _run(root / "run-b", B, SLO_B)


@pytest.fixture(scope="module")
def frame(runs: tuple[Path, Path]) -> pd.DataFrame:
    return compare.compare_runs(*runs)


def _row(frame: pd.DataFrame, entry_name: str, size: int, metric: str) -> pd.Series:
    rows = frame[(frame["entry"] == entry_name) & (frame["list_size"] == size) & (frame["metric"] == metric)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_ratios_are_b_over_a_of_the_rows_figures(frame: pd.DataFrame) -> None:
    row = _row(frame, "int8", 100, "p99")
    merged = {x: recorder([v for i, m in enumerate(spec["int8"][0]) for v in _values("int8", m, i)]).percentiles()
              for x, spec in (("a", A), ("b", B))}
    assert (row["a_median"], row["b_median"]) == pytest.approx((merged["a"]["p99"], merged["b"]["p99"]))
    assert row["ratio"] == pytest.approx(merged["b"]["p99"] / merged["a"]["p99"])
    assert row["a_min"] <= row["a_median"] <= row["a_max"]  # the trials' own p99s around the merged one
    assert _row(frame, "baseline", 100, "rps")["ratio"] == pytest.approx(106.0 / 105.0)
    cache = _row(frame, "cache", 100, "max_rps_under_slo")
    assert cache["ratio"] == pytest.approx(1500.0 / 1200.0)
    assert (cache["a_min"], cache["a_max"], cache["a_status"]) == (1200.0, 1250.0, CONVERGED)  # its bracket


def test_change_outside_the_spread_is_flagged(frame: pd.DataFrame) -> None:
    assert _row(frame, "int8", 100, "p99")["verdict"] == "regression"  # slower
    assert _row(frame, "int8", 100, "rps")["verdict"] == "regression"  # fewer requests/s
    assert _row(frame, "cache", 100, "p99")["verdict"] == "gain"
    assert _row(frame, "cache", 100, "rps")["verdict"] == "gain"
    assert _row(frame, "cache", 100, "max_rps_under_slo")["verdict"] == "gain"  # 1500 beyond [1200, 1250]


def test_change_inside_the_spread_is_not_flagged(frame: pd.DataFrame) -> None:
    for metric in ("p50", "p99", "rps"):
        assert _row(frame, "baseline", 100, metric)["verdict"] == "", metric  # 42 -> 43 ms, trials 40..45
    assert (frame[frame["list_size"] == 1000]["verdict"] == "").all()  # the same latencies


def test_a_generator_bound_maximum_is_shown_but_never_flagged(frame: pd.DataFrame) -> None:
    row = _row(frame, "baseline", 100, "max_rps_under_slo")
    assert (row["a_status"], row["b_status"]) == (CONVERGED, GENERATOR_BOUND)
    assert row["verdict"] == ""  # 60 -> 90/s, but B's figure is the generator's limit
    assert compare._cell(row["b_median"], row["b_min"], row["b_max"], row["b_status"]) == \
        "90.00 [90.00-95.00] GENERATOR-BOUND"


def test_verdict_rule() -> None:
    a = pd.Series({"median": 10.0, "min": 9.0, "max": 11.0})
    assert compare.verdict("p99", a, pd.Series({"median": 12.5, "min": 12.0, "max": 13.0})) == "regression"
    assert compare.verdict("p99", a, pd.Series({"median": 11.5, "min": 11.0, "max": 12.0})) == ""
    assert compare.verdict("rps", a, pd.Series({"median": 12.5, "min": 12.0, "max": 13.0})) == "gain"
    # Single trials have no spread: the relative floor decides.
    one = pd.Series({"median": 100.0, "min": 100.0, "max": 100.0})
    assert compare.verdict("p50", one, pd.Series({"median": 103.0, "min": 103.0, "max": 103.0})) == ""
    assert compare.verdict("p50", one, pd.Series({"median": 110.0, "min": 110.0, "max": 110.0})) == "regression"
    slo_a = pd.Series({"median": 100.0, "min": 100.0, "max": 104.0, "status": CONVERGED})
    slo_b = pd.Series({"median": 200.0, "min": 200.0, "max": 210.0, "status": "LOWER-BOUND"})
    assert compare.verdict("max_rps_under_slo", slo_a, slo_b) == "gain"
    assert compare.verdict("max_rps_under_slo", slo_a, pd.Series({**slo_b, "status": "INVALID"})) == ""


def test_cli_prints_the_table_and_can_fail_on_regression(runs: tuple[Path, Path]) -> None:
    run_a, run_b = (str(r) for r in runs)
    script = str(Path(compare.__file__))
    done = subprocess.run([sys.executable, script, run_a, run_b], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "regression" in done.stdout and "int8" in done.stdout and "GENERATOR-BOUND" in done.stdout
    assert "3 regression(s), 4 gain(s)" in done.stdout
    assert compare.main([run_a, run_b, "--fail-on-regression"]) == 1
    assert compare.main([run_a, run_a, "--fail-on-regression"]) == 0


def test_cli_rejects_a_folder_that_is_not_a_run(tmp_path: Path, runs: tuple[Path, Path]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(tmp_path), str(runs[1])])
    assert exit_info.value.code == 2

"""compare.py on the two fixture runs: ratios of the medians, and a change flagged only beyond the
runs' own spread (trial min-max)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from loadtest import compare

FIXTURES = Path(__file__).parent / "fixtures" / "runs"
RUN_A, RUN_B = FIXTURES / "run-a", FIXTURES / "run-b"


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return compare.compare_runs(RUN_A, RUN_B)


def _row(frame: pd.DataFrame, entry: str, size: int, metric: str) -> pd.Series:
    rows = frame[(frame["entry"] == entry) & (frame["list_size"] == size) & (frame["metric"] == metric)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_ratios_are_b_over_a_medians(frame: pd.DataFrame) -> None:
    row = _row(frame, "int8", 100, "p99")
    assert (row["a_median"], row["b_median"]) == (11.0, 16.0)
    assert row["ratio"] == pytest.approx(16.0 / 11.0)
    assert _row(frame, "baseline", 100, "rps")["ratio"] == pytest.approx(106.0 / 105.0)
    assert _row(frame, "cache", 100, "max_rps_under_slo")["ratio"] == pytest.approx(1500.0 / 1200.0)


def test_change_outside_the_spread_is_flagged(frame: pd.DataFrame) -> None:
    assert _row(frame, "int8", 100, "p99")["verdict"] == "regression"  # slower
    assert _row(frame, "int8", 100, "rps")["verdict"] == "regression"  # fewer requests/s
    assert _row(frame, "cache", 100, "p99")["verdict"] == "gain"
    assert _row(frame, "cache", 100, "rps")["verdict"] == "gain"


def test_change_inside_the_spread_is_not_flagged(frame: pd.DataFrame) -> None:
    for metric in ("p50", "p99", "rps"):
        assert _row(frame, "baseline", 100, metric)["verdict"] == ""  # 42 -> 43 ms with trials 40..45
    assert (frame[frame["list_size"] == 1000]["verdict"] == "").all()  # identical


def test_verdict_rule() -> None:
    a = pd.Series({"median": 10.0, "min": 9.0, "max": 11.0})
    assert compare.verdict("p99", a, pd.Series({"median": 12.5, "min": 12.0, "max": 13.0})) == "regression"
    assert compare.verdict("p99", a, pd.Series({"median": 11.5, "min": 11.0, "max": 12.0})) == ""
    assert compare.verdict("rps", a, pd.Series({"median": 12.5, "min": 12.0, "max": 13.0})) == "gain"
    # Single trials have no spread: the relative floor decides.
    one = pd.Series({"median": 100.0, "min": 100.0, "max": 100.0})
    assert compare.verdict("p50", one, pd.Series({"median": 103.0, "min": 103.0, "max": 103.0})) == ""
    assert compare.verdict("p50", one, pd.Series({"median": 110.0, "min": 110.0, "max": 110.0})) == "regression"


def test_cli_prints_the_table_and_can_fail_on_regression() -> None:
    script = Path(compare.__file__)
    done = subprocess.run([sys.executable, str(script), str(RUN_A), str(RUN_B)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "regression" in done.stdout and "int8" in done.stdout
    assert "3 regression(s), 4 gain(s)" in done.stdout
    failing = subprocess.run([sys.executable, str(script), str(RUN_A), str(RUN_B), "--fail-on-regression"],
                             capture_output=True, text=True, timeout=120)
    assert failing.returncode == 1
    same = subprocess.run([sys.executable, str(script), str(RUN_A), str(RUN_A), "--fail-on-regression"],
                          capture_output=True, text=True, timeout=120)
    assert same.returncode == 0 and "0 regression(s), 0 gain(s)" in same.stdout


def test_cli_rejects_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(Path(compare.__file__)), str(tmp_path), str(RUN_B)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not a run folder" in done.stderr

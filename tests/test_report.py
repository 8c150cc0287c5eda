"""report.py on the fixture run folders: summary.md holds every row, the numbers are the trials' medians,
the time breakdown adds up, and the plots are written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loadtest import report

FIXTURES = Path(__file__).parent / "fixtures" / "runs"


@pytest.fixture
def run_a(tmp_path: Path) -> Path:
    """A copy of fixture run A (the report writes into its run folder)."""
    return Path(shutil.copytree(FIXTURES / "run-a", tmp_path / "run-a"))


def test_summary_md_has_one_row_per_optimization_and_list_size(run_a: Path) -> None:
    text = report.write_report(run_a)
    assert (run_a / "summary.md").read_text() == text
    assert "## CPU: 100 documents per request" in text
    assert "## CPU: 1000 documents per request" in text
    for label in ("| baseline ", "| int8 ", "| cache (cache-mix) "):
        assert text.count(label) == 4, label  # main table and breakdown, at both list sizes
    assert "Where the time goes" in text
    assert "| CPU | AMD" in text or "| CPU |" in text  # the environment block
    assert "service on [0], load generator on [1]" in text


def test_summary_values_are_trial_medians_with_spread_speedup_and_accuracy(run_a: Path) -> None:
    summary = report.summary_frame(report.load_run(run_a))
    row = summary[(summary["entry"] == "int8") & (summary["list_size"] == 100)].iloc[0]
    assert row["p99"] == pytest.approx(11.0)
    assert row["rps"] == pytest.approx(410.0)
    assert (row["rps_min"], row["rps_max"]) == (400.0, 420.0)
    assert row["trials"] == 3
    assert row["speedup"] == pytest.approx(410.0 / 105.0)
    assert row["ndcg10_retention"] == pytest.approx(0.995)
    assert row["size_mb"] == pytest.approx(0.5)
    cache = summary[(summary["entry"] == "cache") & (summary["list_size"] == 100)].iloc[0]
    assert cache["scenario"] == "cache-mix"
    assert cache["cache_hit_ratio"] == pytest.approx(0.8)
    assert cache["max_rps_under_slo"] == pytest.approx(1200.0)
    assert cache["slo_speedup"] == pytest.approx(1200.0 / 90.0)
    assert list(summary[summary["list_size"] == 100]["entry"]) == ["baseline", "int8", "cache"]


def test_best_under_slo_is_reported(run_a: Path) -> None:
    text = report.write_report(run_a, plots=False)
    assert "`cache`, 1,200 requests/s, 13.3 times the baseline's" in text


def test_time_breakdown_adds_up_to_the_client_latency(run_a: Path) -> None:
    breakdown = report.breakdown_frame(report.load_run(run_a))
    row = breakdown[(breakdown["entry"] == "baseline") & (breakdown["list_size"] == 100)].iloc[0]
    assert row["client_mean"] == pytest.approx(23.1)  # median of the trials' means (1.1 x p50)
    assert row["client_transport_proxy"] == pytest.approx(row["client_mean"] - row["server_total"])
    parts = ["server_parse", "server_cache", "server_queue", "server_inference", "server_other"]
    assert sum(row[p] for p in parts) == pytest.approx(row["server_total"])


def test_plots_and_csvs_are_written(run_a: Path) -> None:
    report.write_report(run_a)
    for size in (100, 1000):
        for kind in ("latency_vs_throughput", "latency_bars"):
            png = run_a / "plots" / f"{kind}_cpu_{size}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((run_a / "trials.csv").read_text().splitlines()) == 1 + 3 * 2 * 3  # entries x sizes x trials
    assert (run_a / "summary.csv").exists() and (run_a / "breakdown.csv").exists()


def test_headline_table_is_markdown_with_every_optimization(run_a: Path) -> None:
    text = report.headline_table(run_a)
    assert text.count("| baseline ") == 2
    assert "13.3x" in text and "max req/s at SLO" in text
    assert "**CPU, 100 documents per request**" in text


def test_failed_entries_are_listed_and_an_empty_run_reports(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "raw").mkdir(parents=True)
    (run / "raw" / "int8.error.json").write_text('{"entry": "int8", "error": "ServiceStartError: boom"}')
    text = report.write_report(run)
    assert "No entry has finished yet." in text
    assert "`int8`: ServiceStartError: boom" in text


def test_gpu_rows_get_their_own_table(run_a: Path) -> None:
    raw = run_a / "raw" / "int8.json"
    gpu = raw.read_text().replace('"device": "cpu"', '"device": "gpu"').replace('"entry": "int8"', '"entry": "int8-gpu"')
    (run_a / "raw" / "int8-gpu.json").write_text(gpu)
    text = report.write_report(run_a, plots=False)
    assert "## GPU: 100 documents per request" in text
    assert "## CPU: 100 documents per request" in text


def test_slo_search_steps_become_a_latency_load_curve(run_a: Path) -> None:
    report.write_report(run_a, plots=False)
    curve = report.slo_curve_frame(report.load_run(run_a))
    baseline = curve[curve["entry"] == "baseline"].sort_values("rate_per_s")
    assert list(baseline["rate_per_s"]) == [45.0, 90.0, 180.0]
    assert list(baseline["meets_slo"]) == [True, True, False]
    assert len((run_a / "slo_steps.csv").read_text().splitlines()) == 1 + 6


def test_readme_headline_block_is_replaced_and_the_rest_kept(run_a: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{report.README_START}\nold figures\n{report.README_END}\nafter\n")
    report.update_readme(run_a, readme)
    text = readme.read_text()
    assert "old figures" not in text and text.startswith("# title\n\nbefore\n") and text.endswith("after\n")
    assert report.headline_table(run_a) in text
    readme.write_text("# no block\n")
    with pytest.raises(ValueError, match="headline"):
        report.update_readme(run_a, readme)

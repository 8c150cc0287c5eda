"""report.py on run folders built from typed records (tests/run_folders.py): a row's percentiles are
those of its trials' merged histograms, thin percentiles are marked, a GENERATOR-BOUND maximum is
shown with its status and never taken as best, degraded answers are counted apart from errors."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest
from run_folders import entry, latencies, recorder, slo, trial, write_run

from loadtest import report
from loadtest.records import CONVERGED, GENERATOR_BOUND, INVALID, EntryRecord
from loadtest.report_tables import LOW_SAMPLES_MARK

FIXTURES = Path(__file__).parent / "fixtures" / "runs"

# baseline, 100 docs: three trials of 1,000 samples around 10 ms; the second has 50 answers at 100 ms.
BASELINE_100 = [latencies(1000, 10.0, seed=0), latencies(1000, 10.0, tail_ms=100.0, tail=50, seed=1),
                latencies(1000, 10.0, seed=2)]
INT8_100 = [latencies(30, 20.0, seed=10 + i) for i in range(3)]  # 90 samples in all: too few for a p99


@pytest.fixture
def run(tmp_path: Path) -> Path:
    baseline = entry("baseline", [
        *(trial(v, rps=r, index=i) for i, (v, r) in enumerate(zip(BASELINE_100, (100.0, 105.0, 110.0), strict=True))),
        *(trial(latencies(1000, 40.0, seed=20 + i), rps=25.0, list_size=1000, index=i) for i in range(3)),
    ], [slo(CONVERGED, 500.0, cap=520.0, steps=[(250.0, "pass", 8.0), (500.0, "pass", 12.0), (520.0, "fail", 80.0)])])
    int8 = entry("int8", [trial(v, rps=400.0 + 10 * i, index=i, failures=2, degraded=5, generator_cpu=0.95)
                          for i, v in enumerate(INT8_100)], [slo(CONVERGED, 800.0, cap=830.0)])
    cache = entry("cache", [trial(latencies(400, 5.0, seed=30 + i), rps=900.0, scenario="cache-mix", index=i)
                            for i in range(3)],
                  [slo(GENERATOR_BOUND, 2000.0, cap=2100.0,
                       steps=[(1000.0, "pass", 4.0), (2000.0, "pass", 6.0), (2100.0, "generator-bound", 9.0)])])
    return write_run(tmp_path / "run", [baseline, int8, cache],
                     errors=[{"entry": "batching", "error": "ServiceStartError: boom\ntraceback"}])


def _row(summary: pd.DataFrame, name: str, size: int = 100) -> pd.Series:
    rows = summary[(summary["entry"] == name) & (summary["list_size"] == size)]
    assert len(rows) == 1
    return rows.iloc[0]


def _table_line(text: str, label: str) -> list[str]:
    """The cells of the first table row of summary.md whose optimization is `label`."""
    line = next(ln for ln in text.splitlines() if re.match(rf"\|\s*{re.escape(label)}\s*\|", ln))
    return [c.strip() for c in line.strip("|").split("|")]


def _header(text: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith("| optimization"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_row_percentiles_are_those_of_the_merged_histogram(run: Path) -> None:
    summary = report.summary_frame(report.load_run(run))
    row = _row(summary, "baseline")
    merged = recorder([v for values in BASELINE_100 for v in values]).percentiles()
    for p in ("p50", "p95", "p99", "p99.9", "max"):
        assert row[p] == pytest.approx(merged[p]), p
    assert row["samples"] == 3000 and row["trials"] == 3 and bool(row["merged"])
    # 50 of 3,000 answers (1.7%) at 100 ms: the p99 is 100 ms, not the median of the trials' p99s (~12 ms).
    trial_p99s = [recorder(v).percentiles()["p99"] for v in BASELINE_100]
    assert row["p99"] == pytest.approx(100.0, rel=1e-3)
    assert statistics.median(trial_p99s) < 20.0
    assert (row["p99_min"], row["p99_max"]) == (min(trial_p99s), max(trial_p99s))
    assert row["rps"] == 105.0 and (row["rps_min"], row["rps_max"]) == (100.0, 110.0)
    assert row["speedup"] == pytest.approx(1.0)
    int8 = _row(summary, "int8")
    assert int8["ndcg10_retention"] == pytest.approx(0.995) and int8["size_mb"] == pytest.approx(0.5)
    assert int8["speedup"] == pytest.approx(410.0 / 105.0)
    assert list(summary[summary["list_size"] == 100]["entry"]) == ["baseline", "int8", "cache"]


def test_percentiles_over_too_few_samples_are_marked(run: Path) -> None:
    text = report.write_report(run, plots=False)
    header = _header(text)
    int8, base = dict(zip(header, _table_line(text, "int8"), strict=True)), \
        dict(zip(header, _table_line(text, "baseline"), strict=True))
    assert int8["samples"] == "90"
    assert int8["p99 ms"].endswith(LOW_SAMPLES_MARK) and int8["p99.9 ms"].endswith(LOW_SAMPLES_MARK)
    assert not int8["p50 ms"].endswith(LOW_SAMPLES_MARK)
    assert base["samples"] == "3,000"
    assert not base["p99 ms"].endswith(LOW_SAMPLES_MARK) and not base["p99.9 ms"].endswith(LOW_SAMPLES_MARK)
    assert "p99 from fewer than 100 samples, or p99.9 from fewer than 1,000" in text
    cache = dict(zip(header, _table_line(text, "cache (cache-mix)"), strict=True))  # 1,200 samples: both fine
    assert not cache["p99 ms"].endswith(LOW_SAMPLES_MARK) and not cache["p99.9 ms"].endswith(LOW_SAMPLES_MARK)
    headline = report.headline_table(run)
    head = dict(zip(_header(headline), _table_line(headline, "int8"), strict=True))
    assert head["p99 ms"].endswith(LOW_SAMPLES_MARK) and head["samples"] == "90"
    assert "p99 from fewer than 100 samples" in headline


def test_generator_bound_maximum_is_shown_with_its_status_and_never_taken_as_best(run: Path) -> None:
    summary = report.summary_frame(report.load_run(run))
    cache = _row(summary, "cache")
    assert cache["slo_status"] == GENERATOR_BOUND and cache["max_rps_under_slo"] == 2000.0
    assert cache["slo_speedup"] is None or cache["slo_speedup"] != cache["slo_speedup"]  # None / NaN
    best = report.best_under_slo(summary)
    assert [(b["entry"], b["max_rps_under_slo"], b["status"]) for b in best] == [("int8", 800.0, CONVERGED)]
    assert best[0]["vs_baseline"] == pytest.approx(800.0 / 500.0)
    text = report.write_report(run, plots=False)
    assert "`int8`, 800 requests/s (CONVERGED), 1.6 times the baseline's" in text
    header = _header(text)
    cells = dict(zip(header, _table_line(text, "cache (cache-mix)"), strict=True))
    assert cells["max req/s under SLO"] == "2,000 GENERATOR-BOUND"
    assert dict(zip(header, _table_line(text, "int8"), strict=True))["max req/s under SLO"] == "800 (1.6x) CONVERGED"
    section = text.split("## Maximum throughput under the objective", 1)[1]
    assert "a GENERATOR-BOUND or INVALID figure never is" in section and "early-stopping" in section
    slo_line = next(ln for ln in section.splitlines() if "| cache " in ln)
    assert "GENERATOR-BOUND" in slo_line and "[2,000, 2,100]" in slo_line and "1 generator-bound" in slo_line
    assert "max rate asked /s" in section and "offered /s" in section and "confidence" in section
    assert "| GENERATOR-BOUND" in report.headline_table(run).replace("2,000 ", "| ")


def test_invalid_search_shows_its_status(run: Path) -> None:
    raw = run / "raw" / "int8.json"
    record = EntryRecord.load(raw)
    record.slo = [slo(INVALID, None, steps=[(400.0, "fail", 90.0)]).to_dict()]
    record.save(raw)
    summary = report.summary_frame(report.load_run(run))
    assert _row(summary, "int8")["slo_status"] == INVALID
    assert report.best_under_slo(summary) == [{"device": "cpu", "list_size": 100, "entry": "baseline",
                                               "max_rps_under_slo": 500.0, "status": CONVERGED, "vs_baseline": 1.0}]
    text = report.write_report(run, plots=False)
    assert dict(zip(_header(text), _table_line(text, "int8"), strict=True))["max req/s under SLO"] == INVALID


def test_degraded_answers_are_counted_apart_from_errors(run: Path) -> None:
    summary = report.summary_frame(report.load_run(run))
    int8 = _row(summary, "int8")
    assert (int8["failures"], int8["degraded"], int8["requests"]) == (6, 15, 96)
    assert int8["error_rate"] == pytest.approx(6 / 96) and int8["degraded_rate"] == pytest.approx(15 / 96)
    text = report.write_report(run, plots=False)
    cells = dict(zip(_header(text), _table_line(text, "int8"), strict=True))
    assert cells["errors"] == "6 (6.25%)" and cells["degraded"] == "15 (15.62%)"
    assert dict(zip(_header(text), _table_line(text, "baseline"), strict=True))["degraded"] == "0"
    assert float(cells["goodput/s"]) < float(cells["req/s (min-max)"].split()[0])


def test_generator_is_named_and_flagged_when_it_may_have_set_the_pace(run: Path) -> None:
    text = report.write_report(run, plots=False)
    header = _header(text)
    assert dict(zip(header, _table_line(text, "int8"), strict=True))["generator"] == \
        "Locust (closed loop) [generator CPU 95%]"
    assert dict(zip(header, _table_line(text, "baseline"), strict=True))["generator"] == "Locust (closed loop)"
    assert "may have set the pace" in text
    headline = report.headline_table(run)
    assert "[generator CPU 95%]" in dict(zip(_header(headline), _table_line(headline, "int8"), strict=True))["req/s"]


def test_summary_md_sections_breakdown_and_failed_entries(run: Path) -> None:
    text = report.write_report(run, plots=False)
    assert (run / "summary.md").read_text() == text
    assert "## CPU: 100 documents per request" in text and "## CPU: 1000 documents per request" in text
    assert text.count("| baseline ") == 5  # main table and breakdown at both list sizes, the SLO table
    assert "Where the time goes" in text
    assert "`batching`: ServiceStartError: boom" in text
    breakdown = report.breakdown_frame(report.load_run(run))
    row = breakdown[(breakdown["entry"] == "baseline") & (breakdown["list_size"] == 100)].iloc[0]
    assert row["client_transport_proxy"] == pytest.approx(row["client_mean"] - row["server_total"])
    parts = ["server_parse", "server_cache", "server_queue", "server_inference", "server_other"]
    assert sum(row[p] for p in parts) == pytest.approx(row["server_total"])


def test_plots_and_csvs_are_written_and_the_slo_curve_uses_the_offered_rate(run: Path) -> None:
    report.write_report(run)
    for kind in ("latency_vs_throughput_cpu_100", "latency_bars_cpu_1000", "slo_steps_cpu_100"):
        assert (run / "plots" / f"{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((run / "trials.csv").read_text().splitlines()) == 1 + 3 + 3 + 3 + 3
    steps = report.slo_steps_frame(report.load_run(run))
    base = steps[steps["entry"] == "baseline"]
    assert list(base["rate_per_s"]) == [250.0, 500.0, 520.0]
    assert list(base["offered_rate_per_s"]) == pytest.approx([0.99 * r for r in (250.0, 500.0, 520.0)])
    assert list(base["outcome"]) == ["pass", "pass", "fail"]
    assert len((run / "slo_steps.csv").read_text().splitlines()) == 1 + 6
    assert (run / "slo.csv").exists() and (run / "summary.csv").exists() and (run / "breakdown.csv").exists()


def test_an_empty_run_reports(tmp_path: Path) -> None:
    empty = tmp_path / "run"
    (empty / "raw").mkdir(parents=True)
    (empty / "raw" / "int8.error.json").write_text('{"entry": "int8", "error": "ServiceStartError: boom"}')
    text = report.write_report(empty)
    assert "No entry has finished yet." in text and "`int8`: ServiceStartError: boom" in text
    assert report.headline_table(empty) == "_No results in this run._\n"


def test_gpu_rows_get_their_own_table(run: Path) -> None:
    record = EntryRecord.load(run / "raw" / "int8.json")
    record.entry, record.service = "int8-gpu", {**record.service, "device": "gpu"}
    record.save(run / "raw" / "int8-gpu.json")
    text = report.write_report(run, plots=False)
    assert "## GPU: 100 documents per request" in text and "## CPU: 100 documents per request" in text


def test_readme_headline_block_is_replaced_and_the_rest_kept(run: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{report.README_START}\nold figures\n{report.README_END}\nafter\n")
    assert report.main([str(run), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old figures" not in text and text.startswith("# title\n\nbefore\n") and text.endswith("after\n")
    assert report.headline_table(run) in text
    assert "**CPU, 100 documents per request**" in text and "max req/s at SLO" in text
    assert _header(text) == ["optimization", "samples", "p50 ms", "p99 ms", "req/s", "goodput/s", "p50 @1 conn",
                             "Ray cost", "errors", "degraded", "max req/s at SLO", "NDCG@10 kept", "speedup"]
    readme.write_text("# no block\n")
    with pytest.raises(ValueError, match="headline"):
        report.update_readme(run, readme)


def test_a_run_from_before_records_still_reports(tmp_path: Path) -> None:
    """Old raw files (no histogram, old SLO keys) load through the records' from_dict."""
    old = Path(shutil.copytree(FIXTURES / "run-a", tmp_path / "run-a"))
    summary = report.summary_frame(report.load_run(old))
    row = _row(summary, "int8")
    assert row["p99"] == pytest.approx(11.0) and not bool(row["merged"])  # the trials' median, said so
    assert _row(summary, "cache")["slo_status"] == "LOWER-BOUND"  # the old "VALID"
    assert "saved no histogram" in report.write_report(old, plots=False)


def test_one_connection_probe_and_ray_cost_against_plain_uvicorn(tmp_path: Path) -> None:
    uvicorn_service = {"server": "uvicorn", "variant": "onnx-int8-dynamic", "device": "cpu", "encoding": "json"}

    def probe(median_ms: float, seed: int):  # noqa: ANN202
        t = trial(latencies(500, median_ms, seed=seed), rps=1000.0 / median_ms)
        t.role, t.users = "probe", 1
        return t

    ray = entry("int8", [trial(latencies(300, 20.0, seed=1), rps=400.0), probe(1.5, 2)])
    plain = entry("uvicorn-int8", [trial(latencies(300, 4.0, seed=3), rps=1600.0), probe(0.75, 4)],
                  service=uvicorn_service)
    path = write_run(tmp_path / "run", [entry("baseline", [trial(latencies(300, 30.0), rps=100.0)]), ray, plain])
    summary = report.summary_frame(report.load_run(path))
    # probe trials make no row of their own, only the one-connection column
    assert len(summary) == 3 and summary["probe_p50"].notna().sum() == 2
    row, ref = _row(summary, "int8"), _row(summary, "uvicorn-int8")
    assert row["probe_p50"] == pytest.approx(1.5, rel=0.05) and ref["probe_p50"] == pytest.approx(0.75, rel=0.05)
    assert row["ray_cost"] == pytest.approx(row["probe_p50"] / ref["probe_p50"])
    assert row["rps_vs_uvicorn"] == pytest.approx(400.0 / 1600.0)
    assert pd.isna(ref["ray_cost"]) and pd.isna(_row(summary, "baseline")["ray_cost"])  # Ray rows only
    text = report.write_report(path, plots=False)
    assert {"p50 @1 conn", "Ray cost", "req/s vs uvicorn"} <= set(_header(text))
    assert f"{row['ray_cost']:.2f}x" in _table_line(text, "int8")


def test_the_generator_self_test_is_quoted_only_from_a_cpu_with_the_same_isa(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from loadtest import report

    run = SimpleNamespace(sweep={"users": 8, "trials": 3, "trial_duration_s": 3, "slo": {"profile": "quick"}},
                          environment={"cpu": {"model": "AMD EPYC", "isa_flags": ["avx", "avx2"]}})
    test = {"max_rate_on_time_per_s": 14000, "added_p50_at_max_ms": 0.0, "path": "results/loadgen/x-selftest.json",
            "environment": {"cpu": {"model": "AMD EPYC", "isa_flags": ["avx2", "avx512_vnni"]}}}
    monkeypatch.setattr(report, "generator_capacity", lambda _run: test)
    assert "14,000" not in report.generators_line(run) and "other ISA flags" in report.generators_line(run)
    test["environment"]["cpu"]["isa_flags"] = ["avx2", "avx"]
    assert "14,000 requests/s" in report.generators_line(run)


def test_the_summary_names_the_machines_instruction_set(run: Path) -> None:
    from models.environment import collect_environment

    environment = collect_environment()
    environment["cpu"].update(model="AMD EPYC", isa_flags=["avx2", "avx512f", "avx512_vnni"])
    (run / "environment.json").write_text(json.dumps({"device": "cpu", **environment}))
    text = report.write_report(run, plots=False)
    assert "Machine: AMD EPYC, instruction set **avx512-vnni**" in text

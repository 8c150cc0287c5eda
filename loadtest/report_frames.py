"""A sweep run folder, loaded through the typed records, as pandas frames (loadtest/report.py's data).

Rows are per (device, list size, entry, scenario): latency percentiles over every sample of the
trials (their HDR histograms merged exactly, never the median of the trials' percentiles), the
trials' requests/s median and min-max, goodput, errors and degraded answers apart, and the
generator with a flag when it may have set the pace. SLO searches keep their status; only
CONVERGED and LOWER-BOUND figures count as a service's limit (best entry, speedup over the baseline).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from loadtest.latency import LatencyRecorder
from loadtest.records import CONVERGED, LOWER_BOUND, EntryRecord, SloStep, TrialRecord
from serve.metrics import STAGES

PERCENTILES = ("p50", "p95", "p99", "p99.9")
SERVER_PARTS = STAGES  # the server's timings_ms stages
USABLE_SLO = (CONVERGED, LOWER_BOUND)  # a GENERATOR-BOUND or INVALID figure is never the service's limit
KEYS = ["device", "list_size", "entry", "scenario"]


@dataclass
class Run:
    """One run folder, loaded: its environment, sweep, entry records, failed entries and manifests."""

    path: Path
    environment: dict
    sweep: dict
    entries: list[EntryRecord]
    errors: list[dict]
    manifests: dict[str, dict] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.environment.get("device") or ("gpu" if self.environment.get("gpu") else "cpu")

    @property
    def entry_order(self) -> list[str]:
        names = [e["name"] for e in self.sweep.get("entries", [])]
        return names + [r.entry for r in self.entries if r.entry not in names]

    @property
    def baseline(self) -> str | None:
        if self.sweep.get("baseline"):
            return self.sweep["baseline"]
        for entry in self.sweep.get("entries", []):
            if entry.get("service", {}).get("server") == "baseline":
                return entry["name"]
        return next((r.entry for r in self.entries if r.service.get("server") == "baseline"), None)


def load_run(run_dir: Path | str) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run folder")
    env_file, sweep_file = run_dir / "environment.json", run_dir / "sweep.yaml"
    environment = json.loads(env_file.read_text()) if env_file.exists() else {}
    sweep = (yaml.safe_load(sweep_file.read_text()) or {}) if sweep_file.exists() else {}
    entries, errors = [], []
    for path in sorted((run_dir / "raw").glob("*.json")):
        if path.name.endswith(".error.json"):
            errors.append(json.loads(path.read_text()))
        else:
            entries.append(EntryRecord.load(path))
    manifests = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "manifests").glob("*.json"))}
    return Run(run_dir, environment, sweep, entries, errors, manifests)


def _device(entry: EntryRecord) -> str:
    return str(entry.service.get("device") or "cpu")


def _list_size(trial: TrialRecord) -> int:
    return int(trial.list_size if trial.list_size is not None else round(trial.n_docs))


# ----------------------------------------------------------------------------------------------
# Frames.
# ----------------------------------------------------------------------------------------------
def trials_frame(run: Run) -> pd.DataFrame:
    """One row per trial (its own percentiles, from its own histogram)."""
    rows = []
    for entry in run.entries:
        for t in entry.trial_records():
            rows.append({
                "entry": entry.entry, "device": _device(entry), "variant": entry.service.get("variant"),
                "encoding": entry.service.get("encoding", t.encoding), "list_size": _list_size(t),
                "scenario": t.scenario, "trial": t.trial, "mode": t.mode, "generator": t.generator,
                "requests": t.requests, "failures": t.failures, "degraded": t.degraded, "error_rate": t.error_rate,
                "rps": t.rps, "goodput_per_s": t.goodput_per_s, "docs_per_s": t.docs_per_s,
                "cache_hit_ratio": t.cache_hit_ratio, "samples": t.samples,
                **{p: t.latency_ms.get(p) for p in (*PERCENTILES, "max", "mean")},
                "generator_bound": t.generator_bound, "generator_cpu": t.generator_cpu.get("utilization"),
                "flags": "; ".join(t.flags()),
                **{f"server_{part}": t.server_timings_ms.get(part) for part in SERVER_PARTS},
            })  # fmt: skip
    return pd.DataFrame(rows, columns=[
        "entry", "device", "variant", "encoding", "list_size", "scenario", "trial", "mode", "generator", "requests",
        "failures", "degraded", "error_rate", "rps", "goodput_per_s", "docs_per_s", "cache_hit_ratio", "samples",
        *PERCENTILES, "max", "mean", "generator_bound", "generator_cpu", "flags",
        *(f"server_{part}" for part in SERVER_PARTS)])  # fmt: skip


def merged_latency(trials: list[TrialRecord]) -> tuple[dict[str, float], bool]:
    """Percentiles over every sample of the trials (their HDR histograms merged exactly), and True.

    A run from before trials saved their histograms gives the medians of the trials' percentiles,
    no sample count, and False.
    """
    if trials and all(t.latency_hdr for t in trials):
        merged = LatencyRecorder()
        for t in trials:
            merged.merge(LatencyRecorder.from_dict(t.latency_hdr or {}))
        return merged.percentiles(), True
    out = {k: _median([t.latency_ms.get(k) for t in trials]) for k in (*PERCENTILES, "max", "mean")}
    return {**out, "count": None}, False


def _median(values: list[Any]) -> float | None:
    present = [float(v) for v in values if v is not None and not pd.isna(v)]
    return statistics.median(present) if present else None


def _row(trials: list[TrialRecord]) -> dict[str, Any]:
    """One table row from the trials of one (device, list size, entry, scenario)."""
    latency, merged = merged_latency(trials)
    requests = sum(t.requests for t in trials)
    failures, degraded = sum(t.failures for t in trials), sum(t.degraded for t in trials)
    weights = [t.samples or t.requests for t in trials]
    if not merged:  # no histograms: the client mean as the server parts' below, a request-weighted mean
        latency["mean"] = sum(t.latency_ms.get("mean", 0.0) * w for t, w in zip(trials, weights, strict=True)) \
            / (sum(weights) or 1)
    server = {}
    for part in SERVER_PARTS:  # request-weighted means, like the merged client mean they are set against
        known = [(t.server_timings_ms[part], w) for t, w in zip(trials, weights, strict=True)
                 if t.server_timings_ms.get(part) is not None]
        total = sum(w for _, w in known)
        server[f"server_{part}"] = sum(v * w for v, w in known) / total if total else None
    gen_bound = sum(t.generator_bound for t in trials)
    cpu_bound = [t.generator_cpu["utilization"] for t in trials if t.mode == "closed-loop" and t.generator_cpu_bound]
    flags = ([f"GENERATOR-BOUND in {gen_bound} of {len(trials)} trials"] if gen_bound else []) + \
        ([f"generator CPU {max(cpu_bound):.0%}"] if cpu_bound else [])
    rps = [t.rps for t in trials]
    return {
        "trials": len(trials), "samples": latency["count"], "merged": merged,
        **{k: latency[k] for k in (*PERCENTILES, "max", "mean")},
        **{f"{p}_{fn.__name__}": fn(t.latency_ms.get(p, 0.0) for t in trials) for p in ("p50", "p99") for fn in (min, max)},
        "rps": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps),
        "goodput_per_s": _median([t.goodput_per_s for t in trials]),
        "docs_per_s": statistics.median(t.docs_per_s for t in trials),
        "requests": requests, "failures": failures, "degraded": degraded,
        "error_rate": failures / requests if requests else None,
        "degraded_rate": degraded / requests if requests else None,
        "cache_hit_ratio": _median([t.cache_hit_ratio for t in trials]),
        "slo_ms": _median([t.slo_ms for t in trials]),
        "generator": ", ".join(dict.fromkeys(t.generator or t.mode for t in trials)),
        "generator_flag": "; ".join(flags), **server,
    }  # fmt: skip


def _probe(trials: list[TrialRecord]) -> dict[str, Any]:
    """The per-request cost: p50 and p99 over the probe trials (one request at a time), merged."""
    if not trials:
        return {"probe_users": None, "probe_p50": None, "probe_p99": None, "probe_samples": None, "probe_rps": None}
    latency, _merged = merged_latency(trials)
    return {"probe_users": trials[0].users, "probe_p50": latency["p50"], "probe_p99": latency["p99"],
            "probe_samples": latency["count"], "probe_rps": statistics.median(t.rps for t in trials)}


def ray_cost(summary: pd.DataFrame, services: dict[str, dict]) -> pd.DataFrame:
    """Each Ray row against plain uvicorn serving the same variant, encoding and cache setting.

    `ray_cost` = the Ray row's p50 at one connection over uvicorn's (what Ray adds per request);
    `rps_vs_uvicorn` = its closed-loop req/s over uvicorn's (what Ray costs in throughput).
    """
    def key(entry: str) -> tuple:
        s = services.get(entry, {})
        return (s.get("variant"), s.get("encoding"), bool(s.get("cache")))

    reference: dict[tuple, pd.Series] = {}
    for _, row in summary.iterrows():
        if services.get(row["entry"], {}).get("server") == "uvicorn":
            reference.setdefault((row["device"], row["list_size"], *key(row["entry"])), row)
    cost, rps = [], []
    for _, row in summary.iterrows():
        ref = reference.get((row["device"], row["list_size"], *key(row["entry"])))
        ray = services.get(row["entry"], {}).get("server") == "ray"
        ok = ray and ref is not None
        cost.append(float(row["probe_p50"] / ref["probe_p50"]) if ok and pd.notna(row["probe_p50"])
                    and pd.notna(ref["probe_p50"]) and ref["probe_p50"] > 0 else None)
        rps.append(float(row["rps"] / ref["rps"]) if ok and ref["rps"] > 0 else None)
    summary["ray_cost"], summary["rps_vs_uvicorn"] = cost, rps
    return summary


def row_frame(run: Run) -> pd.DataFrame:
    """One row per (device, list size, entry, scenario): merged percentiles, trial spread, honesty figures."""
    groups: dict[tuple, list[TrialRecord]] = {}
    probes: dict[tuple, list[TrialRecord]] = {}
    for entry in run.entries:
        for t in entry.trial_records():
            key = (_device(entry), _list_size(t), entry.entry, t.scenario)
            (probes if t.role == "probe" else groups).setdefault(key, []).append(t)
    rows = [{**dict(zip(KEYS, key, strict=True)), **_row(trials), **_probe(probes.get(key, []))}
            for key, trials in groups.items()]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = {name: i for i, name in enumerate(run.entry_order)}
    frame["_order"] = frame["entry"].map(order)
    return frame.sort_values(["device", "list_size", "_order", "scenario"]).drop(columns="_order") \
        .reset_index(drop=True)


def slo_frame(run: Run) -> pd.DataFrame:
    """One row per SLO search: its status and every figure that says how far to trust it."""
    rows = []
    for entry in run.entries:
        for r in entry.slo_results():
            outcomes = [s.outcome for s in r.step_records()]
            rows.append({
                "entry": entry.entry, "device": _device(entry), "list_size": int(r.list_size or 0),
                "slo_status": r.status, "max_rps_under_slo": r.max_rate_per_s,
                "offered_rate_per_s": r.offered_rate_per_s, "achieved_rate_per_s": r.achieved_rate_per_s,
                "p99_ms": r.p99_ms, "samples": r.samples, "confidence": r.confidence,
                "confidence_target": r.confidence_target, "bracket_pass": r.bracket[0] if r.bracket else None,
                "bracket_cap": r.bracket[1] if len(r.bracket) > 1 else None, "tolerance": r.tolerance,
                "steps": len(outcomes), "steps_pass": outcomes.count("pass"), "steps_fail": outcomes.count("fail"),
                "steps_generator_bound": outcomes.count("generator-bound"), "stopped_by": r.stopped_by,
                "profile": r.profile, "reasons": "; ".join(r.reasons), "note": r.note, "slo_p99_ms": r.slo_p99_ms,
            })  # fmt: skip
    return pd.DataFrame(rows, columns=[
        "entry", "device", "list_size", "slo_status", "max_rps_under_slo", "offered_rate_per_s",
        "achieved_rate_per_s", "p99_ms", "samples", "confidence", "confidence_target", "bracket_pass",
        "bracket_cap", "tolerance", "steps", "steps_pass", "steps_fail", "steps_generator_bound", "stopped_by",
        "profile", "reasons", "note", "slo_p99_ms"])  # fmt: skip


def _step_trial(step: SloStep) -> TrialRecord | None:
    try:
        return step.trial_record
    except TypeError:  # an SLO step from before records.py kept only a few of the trial's figures
        return None


def slo_steps_frame(run: Run) -> pd.DataFrame:
    """Every rate an SLO search tried: asked, offered and achieved rates, p50/p99 and the outcome."""
    rows = []
    for entry in run.entries:
        for r in entry.slo_results():
            for index, step in enumerate(r.step_records()):
                t = _step_trial(step)
                rows.append({
                    "entry": entry.entry, "device": _device(entry), "list_size": int(r.list_size or 0),
                    "status": r.status, "step": index, "rate_per_s": step.rate_per_s,
                    "offered_rate_per_s": t.offered_rate_per_s if t else None,
                    "achieved_rate_per_s": t.achieved_rate_per_s if t else None,
                    "p50": t.latency_ms.get("p50") if t else None, "p99": t.latency_ms.get("p99") if t else None,
                    "samples": t.samples if t else None, "outcome": step.outcome, "why": step.why,
                    "confidence": step.confidence, "late_fraction": t.late_fraction if t else None,
                })  # fmt: skip
    return pd.DataFrame(rows, columns=[
        "entry", "device", "list_size", "status", "step", "rate_per_s", "offered_rate_per_s", "achieved_rate_per_s",
        "p50", "p99", "samples", "outcome", "why", "confidence", "late_fraction"])  # fmt: skip


def _variant_info(manifest: dict, variant: str) -> dict:
    """The manifest's record of one variant, whichever of the usual shapes the manifest has."""
    variants = manifest.get("variants", manifest)
    if isinstance(variants, list):
        variants = {v.get("name"): v for v in variants if isinstance(v, dict)}
    info = variants.get(variant) if isinstance(variants, dict) else None
    return info if isinstance(info, dict) else {}


def _first_number(info: dict, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        node: Any = info
        for part in key.split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return float(node)
    return None


def accuracy_of(run: Run, model: str | None, variant: str | None) -> dict:
    """NDCG@10 retention and file size of a variant, from the manifest snapshotted into the run."""
    if not variant or not run.manifests:
        return {"ndcg10_retention": None, "size_mb": None}
    manifest = run.manifests.get(model) if model else None
    manifest = manifest or next(iter(run.manifests.values()))
    info = _variant_info(manifest, variant)
    retention = _first_number(info, ("ndcg10_retention", "ndcg@10_retention", "retention/ndcg@10",
                                     "accuracy/ndcg10_retention", "accuracy/ndcg@10_retention",
                                     "accuracy/retention"))
    size = _first_number(info, ("size_bytes", "file_size_bytes", "file_size", "bytes"))
    size_mb = _first_number(info, ("size_mb", "file_size_mb"))
    if size_mb is None and size is not None:
        size_mb = size / 2**20
    return {"ndcg10_retention": retention, "size_mb": size_mb}


def summary_frame(run: Run) -> pd.DataFrame:
    """The rows, with the SLO search (status included), accuracy and speedups over the baseline."""
    summary = row_frame(run)
    if summary.empty:
        return summary
    slo = slo_frame(run).drop_duplicates(["entry", "device", "list_size"], keep="last")
    summary = summary.merge(slo[["entry", "device", "list_size", "max_rps_under_slo", "slo_status"]],
                            on=["entry", "device", "list_size"], how="left")
    usable = summary["slo_status"].isin(USABLE_SLO)
    summary["usable_rps_under_slo"] = summary["max_rps_under_slo"].where(usable)
    services = {r.entry: r.service for r in run.entries}
    accuracy = [accuracy_of(run, services[e].get("model"), services[e].get("variant")) for e in summary["entry"]]
    summary["ndcg10_retention"] = [a["ndcg10_retention"] for a in accuracy]
    summary["size_mb"] = [a["size_mb"] for a in accuracy]
    summary["speedup"] = _speedups(summary, run.baseline, "rps")
    summary = ray_cost(summary, services)
    summary["slo_speedup"] = _speedups(summary, run.baseline, "usable_rps_under_slo")
    return summary


def _speedups(summary: pd.DataFrame, baseline: str | None, column: str) -> list[float | None]:
    """`column` over the baseline's, at the same device and list size (the baseline's first scenario)."""
    if baseline is None:
        return [None] * len(summary)
    base_rows = summary[summary["entry"] == baseline].groupby(["device", "list_size"])[column].first()
    speedups = []
    for _, row in summary.iterrows():
        base = base_rows.get((row["device"], row["list_size"]))
        value = row[column]
        ok = base is not None and pd.notna(base) and base > 0 and value is not None and pd.notna(value)
        speedups.append(float(value / base) if ok else None)
    return speedups


def best_under_slo(summary: pd.DataFrame) -> list[dict]:
    """Per device and list size: the best CONVERGED or LOWER-BOUND entry, and its ratio to the baseline's."""
    if summary.empty or summary["usable_rps_under_slo"].isna().all():
        return []
    best = []
    searched = summary[summary["usable_rps_under_slo"].notna()]
    for (device, list_size), part in searched.groupby(["device", "list_size"], sort=False):
        row = part.loc[part["usable_rps_under_slo"].astype(float).idxmax()]
        best.append({"device": device, "list_size": int(list_size), "entry": row["entry"],
                     "max_rps_under_slo": float(row["usable_rps_under_slo"]), "status": row["slo_status"],
                     "vs_baseline": None if pd.isna(row["slo_speedup"]) else float(row["slo_speedup"])})
    return best


def breakdown_frame(run: Run, rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """Where a request's mean time went: client+transport+proxy = client mean - server total."""
    rows = row_frame(run) if rows is None else rows
    if rows.empty:
        return pd.DataFrame()
    means = rows[[*KEYS, "mean", *(f"server_{p}" for p in SERVER_PARTS)]].copy()
    known = means[[f"server_{p}" for p in SERVER_PARTS if p != "total"]].fillna(0).sum(axis=1)
    means["client_transport_proxy"] = (means["mean"] - means["server_total"]).clip(lower=0)
    means["server_other"] = (means["server_total"] - known).clip(lower=0)
    return means.rename(columns={"mean": "client_mean"})

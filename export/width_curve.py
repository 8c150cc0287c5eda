"""Where int8 starts to pay as the MLP grows: the same variants at several widths, side by side.

Why: the default MLP (256 x 128 hidden, 68K multiply-adds per document) is small, and int8's gain is
eaten by the float work beside the integer products: the feature normalizer (log1p of every raw
feature) and quantizing activations, which export/int8_attempts.py measures node by node. A wider
layer does more multiply-adds per feature read, so the int8 kernels' advantage (the machine's int8
roof over its fp32 roof) shows more. Each width is trained (models/train.py `--hidden`),
exported, gated and benchmarked by export/quantize.py exactly as the lab's models are, one thread;
this script only runs them and sets their figures side by side.

    python export/width_curve.py [--widths 256x128 384x192 640x256 768x512 1152x768] [--train-seconds 30] [--rounds 3]

Writes results/models/<cpu>-<isa>-mlp-widths.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.report import results_stem, write_report_files
from models.environment import collect_environment, environment_markdown
from models.paths import REPO_ROOT, model_dir, variants_dir

INT8_VARIANTS = ("onnx-int8-dynamic", "onnx-int8-static")
# torch-bf16 is built only where the CPU has native bf16 (export/variants.py); elsewhere quantize.py skips
# it and the report says why.
VARIANTS = ("onnx-fp32", *INT8_VARIANTS, "torch-bf16")
SIZES = (100, 1000)
PAYS = 1.1  # int8 "pays" from a speed-up over onnx-fp32 of at least this much
STRONG = 2.5  # and pays strongly from this one (what a VNNI machine's int8 roof, ~4.5x fp32's, allows)


def width_name(hidden: tuple[int, ...]) -> str:
    return "mlp-w" + "x".join(map(str, hidden))


def build(hidden: tuple[int, ...], train_seconds: float, work: Path, rounds: int) -> list[dict]:
    """Train (unless the checkpoint exists), then export, gate and benchmark one width `rounds` times;
    each round's manifest."""
    name = width_name(hidden)
    if not (model_dir(name) / "model_card.json").exists():
        subprocess.run([sys.executable, "models/train.py", "--arch", "mlp", "--hidden", *map(str, hidden), "--name",
                        name, "--max-seconds", str(train_seconds), "--quiet"], cwd=REPO_ROOT, check=True, timeout=1800)
    manifests = []
    for round_ in range(rounds):
        subprocess.run([sys.executable, "export/quantize.py", "--arch", "mlp", "--checkpoint", str(model_dir(name)),
                        "--variants", "torch-eager", *VARIANTS, "--threads", "1", "--sizes", *map(str, SIZES),
                        "--results-dir", str(work / name / f"round-{round_ + 1}")], cwd=REPO_ROOT, check=True,
                       timeout=1800)
        manifests.append(json.loads((variants_dir(name) / "manifest.json").read_text()))
    return manifests


def rows_of(hidden: tuple[int, ...], manifests: list[dict]) -> list[dict[str, Any]]:
    """One row per variant: retention and validity (the same every round: the builds are deterministic),
    and per size the median over rounds of documents per second, of the speed-up over onnx-fp32 measured
    in the same round, and of the roof fraction."""
    def cell(manifest: dict, variant: str, n_docs: int) -> dict:
        entry = manifest["variants"][variant]
        return next(r for r in entry["benchmark"] if r["threads"] == 1 and r["n_docs"] == n_docs
                    and r["device"] == "cpu")

    first = manifests[0]
    rows = []
    for variant in (v for v in VARIANTS if v in first["variants"]):
        entry = first["variants"][variant]
        row: dict[str, Any] = {"hidden": list(hidden), "macs_per_doc": first["model"]["macs_per_document"]["1000"],
                               "variant": variant, "valid": entry["valid"], "rounds": len(manifests),
                               "retention": entry["accuracy"]["retention"]}
        for n in SIZES:
            cells = [cell(m, variant, n) for m in manifests]
            speedups = [c["docs_per_s"] / cell(m, "onnx-fp32", n)["docs_per_s"] for c, m in zip(cells, manifests, strict=True)]
            row[f"docs_per_s@{n}"] = float(np.median([c["docs_per_s"] for c in cells]))
            row[f"speedup@{n}"] = float(np.median(speedups))
            row[f"roof_fraction@{n}"] = float(np.median([c["roof_fraction"] for c in cells]))
            row[f"speedup_range@{n}"] = [min(speedups), max(speedups)]
        rows.append(row)
    return rows


def findings(rows: list[dict], roofs: dict, skipped: dict[str, str] | None = None) -> list[str]:
    int8 = [r for r in rows if r["variant"] in INT8_VARIANTS and r["valid"]]
    out = [f"Roofs on this machine, 1 thread: int8 {roofs['int8']['1'] / 1e9:.1f} G multiply-adds/s against fp32 "
           f"{roofs['fp32']['1'] / 1e9:.1f} G ({roofs['int8']['1'] / roofs['fp32']['1']:.2f}x): the most any int8 "
           "variant can gain over fp32 at equal efficiency."]
    for n in SIZES:
        paying = sorted({r["macs_per_doc"] for r in int8 if r[f"speedup@{n}"] >= PAYS})
        best = max(int8, key=lambda r: r[f"speedup@{n}"], default=None)
        if best is None:
            continue
        strong = sorted({r["macs_per_doc"] for r in int8 if r[f"speedup@{n}"] >= STRONG})
        out.append(f"At {n} documents, the best valid int8 variant ran {best[f'speedup@{n}']:.2f}x onnx-fp32 "
                   f"({best['variant']}, {best['macs_per_doc'] / 1e3:,.0f}K multiply-adds per document, "
                   f"{best[f'roof_fraction@{n}']:.0%} of the int8 roof); int8 paid ({PAYS}x or more) "
                   + (f"from {paying[0] / 1e3:,.0f}K multiply-adds per document" if paying else "at no width measured")
                   + f", and ran {STRONG}x or more "
                   + (f"from {strong[0] / 1e3:,.0f}K." if strong else "at no width measured."))
    bf16 = sorted((r for r in rows if r["variant"] == "torch-bf16"), key=lambda r: r["macs_per_doc"])
    if bf16:
        out.append("torch-bf16 (bfloat16 autocast) against onnx-fp32, from the smallest width to the largest: "
                   + "; ".join(f"{n} documents " + ", ".join(f"{r[f'speedup@{n}']:.2f}x" for r in bf16) for n in SIZES)
                   + (" (retention " + ", ".join(f"{r['retention']:.4f}" for r in bf16) + ")")
                   + ("" if all(r["valid"] for r in bf16) else "; some widths failed the accuracy gate") + ".")
    elif skipped and "torch-bf16" in skipped:
        out.append(f"torch-bf16 was skipped on this CPU: {skipped['torch-bf16']}.")
    return out


def spread(row: dict, n: int) -> str:
    """' (low-high)': the rounds' range of a speed-up, where there were several rounds."""
    low, high = row.get(f"speedup_range@{n}") or (None, None)
    return f" ({low:.2f}-{high:.2f})" if low is not None and row.get("rounds", 1) > 1 else ""


def markdown(report: dict) -> str:
    lines = ["# Where int8 starts to pay: the MLP at several widths", "",
             f"Written by `python export/width_curve.py --widths {' '.join('x'.join(map(str, w)) for w in report['widths'])}"
             f" --train-seconds {report['train_seconds']:g}"
             + (f" --rounds {report['rounds']}`." if report.get("rounds") else "`."),
             "", "## Findings (computed from the rows)", "",
             *[f"- {line}" for line in findings(report["rows"], report["roofs"], report.get("skipped"))], "",
             "| hidden | multiply-adds / doc | variant | valid | retention | docs/s @100 | x fp32 @100 | docs/s @1000 "
             "| x fp32 @1000 | roof fraction @1000 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        lines.append(f"| {'x'.join(map(str, r['hidden']))} | {r['macs_per_doc']:,.0f} | {r['variant']} | "
                     f"{'yes' if r['valid'] else 'no'} | {r['retention']:.4f} | {r['docs_per_s@100']:,.0f} | "
                     f"{r['speedup@100']:.2f}x{spread(r, 100)} | {r['docs_per_s@1000']:,.0f} | "
                     f"{r['speedup@1000']:.2f}x{spread(r, 1000)} | "
                     f"{r['roof_fraction@1000']:.0%} |")
    lines += ["", "How to read it: each width trained for at most the given seconds on the synthetic data, then "
              "export/quantize.py built, gated (NDCG@10 retention against its own torch model) and benchmarked "
              "each variant, 1 thread, one list per call, as in the lab's tables. Roof fraction: achieved "
              "multiply-adds per second over the int8 roof (int8 variants), the bf16 roof (torch-bf16) or the fp32 "
              "roof (onnx-fp32)."
              + (f" Each figure is the median of {report['rounds']} benchmark rounds (a speed-up over onnx-fp32 "
                 "measured within each round), with the rounds' lowest and highest speed-up in brackets."
                 if report.get("rounds", 1) > 1 else ""),
              "", environment_markdown(report["environment"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", nargs="+", default=["256x128", "384x192", "640x256", "768x512", "1152x768"],
                   help="hidden sizes per width, e.g. 640x256")
    p.add_argument("--train-seconds", type=float, default=30.0)
    p.add_argument("--rounds", type=int, default=3,
                   help="benchmark rounds per width; the table gives each cell's median (this machine is noisy)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "models")
    p.add_argument("--work", type=Path, default=REPO_ROOT / "artifacts" / "width_curve")
    p.add_argument("--from-json", type=Path, default=None, metavar="REPORT",
                   help="write a report's Markdown again from its JSON, beside it (no new measurement)")
    args = p.parse_args(argv)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        path = args.from_json.with_suffix(".md")
        path.write_text(markdown(report))
        print(f"wrote {path}")
        return 0
    if args.rounds < 1:
        p.error(f"--rounds: must be >= 1, got {args.rounds}")
    widths = [tuple(int(h) for h in w.split("x")) for w in args.widths]
    rows, roofs, skipped = [], None, {}
    for hidden in widths:
        manifests = build(hidden, args.train_seconds, args.work, args.rounds)
        rows += rows_of(hidden, manifests)
        roofs = manifests[-1]["roofs"]
        skipped = manifests[-1].get("skipped") or {}
    environment = collect_environment()
    report = {"widths": [list(w) for w in widths], "train_seconds": args.train_seconds, "rounds": args.rounds, "rows": rows,
              "skipped": skipped,
              "roofs": roofs, "environment": environment}
    stem = f"{results_stem(environment, 'quick')}-mlp-widths"
    print(f"wrote {write_report_files(args.out, stem, report, lambda: markdown(report))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

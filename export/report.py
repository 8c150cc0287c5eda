"""The per-machine results table of the variants: Markdown + CSV under results/models/, rich on screen.

One row per variant and thread setting: size, NDCG@10 and its retention, validity, p50/p99 at 100
and 1000 documents, documents per second, speedup over onnx-fp32, and fraction of the roof. The CSV
holds every measured cell; the Markdown ends with the environment block of the run.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

if __package__ in (None, ""):  # run as a script: `python export/report.py <manifest.json>`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.manifest import Manifest  # noqa: E402
from models.environment import environment_markdown  # noqa: E402
from models.paths import RESULTS  # noqa: E402

BASELINE = "onnx-fp32"
SCREEN_HIDDEN = {"docs/s@100", "size MB"}  # the terminal table drops these to fit; files keep them


def cpu_slug(environment: dict) -> str:
    """'AMD EPYC 9R14 96-Core Processor' -> 'amd-epyc-9r14-96-core-processor'."""
    return re.sub(r"[^a-z0-9]+", "-", environment["cpu"]["model"].lower()).strip("-") or "unknown-cpu"


def isa_slug(environment: dict) -> str:
    """The ISA level that decides the kernels: 'amx', 'avx512-vnni', 'avx512', 'avx2', else the arch.

    export.report.cpu_slug names the CPU model only ('amd-epyc'), and one model name covers machines
    with and without AVX-512 here, so results files (reliability, two-stage) are named by both."""
    flags = set(environment["cpu"].get("isa_flags") or [])
    for flag, name in (("amx_int8", "amx"), ("avx512_vnni", "avx512-vnni"), ("avx512f", "avx512"),
                       ("avx2", "avx2"), ("asimddp", "neon-dotprod"), ("asimd", "neon")):
        if flag in flags:
            return name
    return environment["cpu"].get("arch") or "unknown-isa"


def results_stem(environment: dict, profile: str) -> str:
    """`<cpu>-<isa>` for a lab's quick profile (its committed run), `<cpu>-<isa>-<profile>` otherwise."""
    base = f"{cpu_slug(environment)}-{isa_slug(environment)}"
    return base if profile == "quick" else f"{base}-{profile}"


def write_report_files(out: Path, stem: str, report: dict, markdown: Callable[[], str]) -> Path:
    """`<out>/<stem>.json` (the whole report: the files can be written again from it, with no new
    measurement) and `<out>/<stem>.md` from `markdown()`; returns the .md path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    path = out / f"{stem}.md"
    path.write_text(markdown())
    return path


def rerender_main(argv: list[str] | None, write_results: Callable[[dict, Path], Path], script: str) -> int:
    """`python <script> <report.json>`: a report's files written again from its JSON, beside it."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print(f"usage: python {script} <report.json>", file=sys.stderr)
        return 2
    path = Path(args[0])
    print(f"wrote {write_results(json.loads(path.read_text()), path.parent)}")
    return 0


def cells_frame(manifest: Manifest) -> pd.DataFrame:
    """Every benchmark cell of every variant, long format, with the variant's accuracy beside it."""
    records = []
    for entry in manifest.variants.values():
        for row in entry.benchmark:
            records.append({
                "variant": entry.name, "precision": entry.precision, "size_mb": entry.size_bytes / 1e6,
                "ndcg10": entry.accuracy.ndcg10, "retention": entry.accuracy.retention, "valid": entry.valid,
                **row.model_dump(),
            })
    return pd.DataFrame.from_records(records)


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None or pd.isna(value) else format(value, pattern)


def summary_rows(manifest: Manifest, device: str = "cpu") -> list[dict[str, str]]:
    """The table's rows (strings), one per variant and thread setting on `device`."""
    cells = cells_frame(manifest)
    rows = []
    for entry in manifest.variants.values():
        acc = entry.accuracy
        validity = ("valid 99.9%" if acc.high_accuracy else "valid 99%") if entry.valid else "INVALID"
        ours = cells[(cells.variant == entry.name) & (cells.device == device)] if len(cells) else cells
        if not len(ours):
            rows.append({"variant": entry.name, "threads": "-", "size MB": f"{entry.size_bytes / 1e6:.2f}",
                         "NDCG@10": f"{acc.ndcg10:.4f}", "retention": f"{acc.retention:.4f}", "validity": validity})
            continue
        for (threads, mode), group in ours.groupby(["threads", "mode"], sort=True):
            at = {int(r.n_docs): r for r in group.itertuples()}
            base = cells[(cells.variant == BASELINE) & (cells.device == "cpu") & (cells.threads == threads)]
            base_at = {int(r.n_docs): r.docs_per_s for r in base.itertuples()}

            def speedup(n: int, at: dict = at, base_at: dict = base_at) -> str:
                return f"{at[n].docs_per_s / base_at[n]:.2f}x" if n in at and n in base_at else "-"

            def cell(n: int, field: str, pattern: str, at: dict = at) -> str:
                return _fmt(getattr(at[n], field), pattern) if n in at else "-"

            rows.append({
                "variant": entry.name, "threads": str(threads), **({"mode": mode} if device != "cpu" else {}),
                "size MB": f"{entry.size_bytes / 1e6:.2f}", "NDCG@10": f"{acc.ndcg10:.4f}",
                "retention": f"{acc.retention:.4f}", "validity": validity,
                "p50@100 ms": cell(100, "p50_ms", ".3f"), "p99@100 ms": cell(100, "p99_ms", ".3f"),
                "p50@1000 ms": cell(1000, "p50_ms", ".3f"), "p99@1000 ms": cell(1000, "p99_ms", ".3f"),
                "docs/s@100": cell(100, "docs_per_s", ",.0f"), "docs/s@1000": cell(1000, "docs_per_s", ",.0f"),
                f"speedup vs {BASELINE} @100": speedup(100), f"speedup vs {BASELINE} @1000": speedup(1000),
                "roof fraction @1000": cell(1000, "roof_fraction", ".1%"),
            })
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(c, "-") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_tables(manifest: Manifest, results_dir: Path, environment: dict) -> tuple[Path, Path]:
    """Write `<cpu>-<isa>-<arch>.md` and `.csv` (named by the ISA too: one CPU model name covers
    machines with and without AVX-512 VNNI here, and their tables must sit side by side); returns both."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"{results_stem(environment, 'quick')}-{manifest.model.arch}"
    roofs = manifest.roofs
    parts = [
        f"# Variants of `{manifest.model.name}` (version {manifest.model.version}) on {environment['cpu']['model']}",
        "",
        "Written by `python export/quantize.py`. One list per call (attention: batch 1), after warm-up. "
        "Validity: NDCG@10 retention vs the fp32 torch model >= 99% (MLPerf's 99% target; 99.9% marked). "
        "Roof fraction: achieved multiply-adds/s over a large matrix product's on this machine "
        "(fp32 roof for fp32/fp16 variants, int8 roof for int8 variants, bf16 roof for bf16 where measured).",
        "",
        "## CPU",
        "",
        markdown_table(summary_rows(manifest, "cpu")),
    ]
    if manifest.skipped:
        parts += ["", *[f"Skipped on this CPU: `{name}`: {reason}." for name, reason in manifest.skipped.items()]]
    gpu = summary_rows(manifest, "cuda")
    if any(r["threads"] != "-" for r in gpu):
        parts += ["", "## GPU", "", markdown_table([r for r in gpu if r["threads"] != "-"])]
    else:
        parts += ["", "GPU rows: none (no GPU on this machine; torch.cuda.is_available() was False)."]
    if roofs:
        bf16 = bool(roofs.bf16)
        parts += ["", "## Roofs (multiply-adds per second)", "", "| threads | fp32 | int8 |" + (" bf16 |" if bf16 else ""),
                  "|---|---|---|" + ("---|" if bf16 else "")]
        parts += [f"| {t} | {roofs.fp32[t] / 1e9:.1f} G | {roofs.int8.get(t, 0) / 1e9:.1f} G |"
                  + (f" {roofs.bf16.get(t, 0) / 1e9:.1f} G |" if bf16 else "") for t in roofs.fp32]
        parts += ["", "; ".join(f"{name}: {method}" for name, method in roofs.method.items()) + "."]
    parts += isa_lines(manifest, environment)
    macs = ", ".join(f"{n} docs: {m:,.0f}" for n, m in manifest.model.macs_per_document.items())
    parts += ["", f"Multiply-adds per document: {macs}.", "", "## Environment", "", environment_markdown(environment), ""]
    md, csv = stem.with_suffix(".md"), stem.with_suffix(".csv")
    md.write_text("\n".join(parts))
    cells_frame(manifest).to_csv(csv, index=False)
    return md, csv


def isa_lines(manifest: Manifest, environment: dict) -> list[str]:
    """What the instruction set decides, computed from this run's roofs and rows (1 thread, the largest
    list measured): an int8 variant's speed-up over onnx-fp32 is the roofs' ratio times the two
    variants' roof fractions' ratio, so the table shows which factor set the result."""
    roofs = manifest.roofs
    cells = cells_frame(manifest)
    if not roofs or "1" not in roofs.fp32 or "1" not in roofs.int8 or not len(cells):
        return []
    cells = cells[(cells.device == "cpu") & (cells.threads == 1)]
    n_docs = int(cells.n_docs.max())
    at = cells[cells.n_docs == n_docs]
    base = at[at.variant == BASELINE]
    int8 = at[(at.precision == "int8") & at.valid]
    ratio = roofs.int8["1"] / roofs.fp32["1"]
    lines = ["", f"## What the instruction set decides (computed from the roofs and the rows, 1 thread, {n_docs} "
             "documents)", "",
             f"- This CPU's ISA level is `{isa_slug(environment)}`: the int8 roof was {roofs.int8['1'] / 1e9:.1f} G "
             f"multiply-adds/s against fp32's {roofs.fp32['1'] / 1e9:.1f} G, **{ratio:.2f}x**. That is the most an "
             "int8 variant can gain over fp32 when both run at the same fraction of their roofs."]
    if len(base) and len(int8):
        best = int8.loc[int8.docs_per_s.idxmax()]
        fp32 = base.iloc[0]
        speedup = best.docs_per_s / fp32.docs_per_s
        lines.append(
            f"- The fastest valid int8 variant, `{best.variant}`, ran **{speedup:.2f}x** onnx-fp32: "
            f"{ratio:.2f}x (the roofs) times {best.roof_fraction:.0%} of its roof over onnx-fp32's "
            f"{fp32.roof_fraction:.0%} of its own ({best.roof_fraction / fp32.roof_fraction:.2f}). "
            + ("The roofs' ratio is the limit here." if best.roof_fraction >= fp32.roof_fraction else
               "The int8 variant's lower roof fraction (the work around its integer products, and the model's "
               "float layers, at a fixed cost) is what kept it below the roofs' ratio; "
               "`python export/int8_attempts.py` splits that time node by node."))
    return lines


def print_table(manifest: Manifest, console: Console | None = None) -> None:
    console = console or Console()
    for device in ("cpu", "cuda"):
        rows = summary_rows(manifest, device)
        if device == "cuda" and not any(r["threads"] != "-" for r in rows):
            continue
        table = Table(title=f"{manifest.model.name} variants ({device})", show_lines=False)
        columns = [c for c in dict.fromkeys(key for row in rows for key in row) if c not in SCREEN_HIDDEN]
        for column in columns:
            table.add_column(column.replace(f"speedup vs {BASELINE}", "x fp32"), overflow="fold")
        for row in rows:
            style = "red" if row.get("validity") == "INVALID" else None
            table.add_row(*(row.get(c, "-") for c in columns), style=style)
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    """`python export/report.py <manifest.json> [results dir]`: a model's tables written again from its
    manifest, with no new measurement (the environment is the one its variants were measured in)."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) not in (1, 2):
        print("usage: python export/report.py <manifest.json> [results dir]", file=sys.stderr)
        return 2
    manifest = Manifest.load(Path(args[0]))
    measured = next(iter(manifest.variants.values()), None)
    if measured is None:
        print(f"{args[0]}: no variants to tabulate", file=sys.stderr)
        return 2
    results_dir = Path(args[1]) if len(args) == 2 else RESULTS / "models"
    md, csv = write_tables(manifest, results_dir, measured.environment)
    print(f"wrote {md} and {csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

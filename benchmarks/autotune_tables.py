"""cuBLAS against inductor's GEMM templates, shape by shape, from the autotuning tables of a compile (issue 8).

With `max_autotune_gemm=true` inductor times every GEMM of a compiled graph with each candidate (cuBLAS's `mm`,
`addmm`, `bias_addmm` and its Triton templates) and prints a table per GEMM to stderr (`AUTOTUNE addmm(...)`, the
fastest choices first, at most `autotune_num_choices_displayed` of them). This script reads such a log (plain or
.gz) and prints one line per table: the GEMM, how many choices there were, cuBLAS's best time (or, when no cuBLAS
choice is among those shown, the slowest time shown, which cuBLAS exceeds), the best template's time and the winner.

    python benchmarks/bench_training.py ... --inductor default,max_autotune_gemm=true 2> autotune.log
    python benchmarks/autotune_tables.py docs/bench/train_autotune_gemm_idgen_h200_s32.log.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

CUBLAS = ("mm", "addmm", "bias_addmm", "bmm", "baddbmm")  # inductor's extern (aten/cuBLAS) choices
_CHOICE = re.compile(r"^\s+(\S+) ([0-9.]+) ms ")
_STATS = re.compile(r'^\{"num_choices": (\d+)')


def parse_log(text: str) -> list[dict]:
    """The autotuning tables of a log, in order: {"gemm", "choices": [(name, ms), ...], "num_choices"}. The choice
    count comes from the "Autotune Choices Stats" line that inductor prints just before each table (None without)."""
    tables, current, pending = [], None, None
    for line in text.splitlines():
        m = _STATS.match(line)
        if m:
            pending = int(m.group(1))
            continue
        if line.startswith("AUTOTUNE "):
            current = {"gemm": line[len("AUTOTUNE "):].strip(), "choices": [], "num_choices": pending}
            tables.append(current)
            pending = None
            continue
        if current is None or line.startswith(("strides:", "dtypes:")):
            continue
        m = _CHOICE.match(line)
        if m:
            current["choices"].append((m.group(1), float(m.group(2))))
        else:
            current = None
    return tables


def summarise(table: dict) -> dict:
    """One table's line: cuBLAS's best time (`cublas_ms`; None if not shown, then `cublas_above_ms` is the slowest
    time shown), the best template's time and the winner."""
    cublas = [ms for name, ms in table["choices"] if name in CUBLAS]
    templates = [ms for name, ms in table["choices"] if name not in CUBLAS]
    shown = [ms for _, ms in table["choices"]]
    return {"gemm": table["gemm"], "num_choices": table["num_choices"], "shown": len(shown),
            "cublas_ms": min(cublas) if cublas else None,
            "cublas_above_ms": None if cublas or not shown else max(shown),
            "template_ms": min(templates) if templates else None,
            "winner": table["choices"][0][0] if table["choices"] else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path, help="a log with inductor's AUTOTUNE tables (.gz allowed)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    try:
        raw = args.log.read_bytes()
        text = (gzip.decompress(raw) if args.log.suffix == ".gz" else raw).decode(errors="replace")
    except (OSError, gzip.BadGzipFile) as exc:
        raise SystemExit(f"{args.log}: cannot read ({exc})") from None
    rows = [summarise(t) for t in parse_log(text)]
    if not rows:
        raise SystemExit(f"{args.log}: no 'AUTOTUNE ...' tables (compiled without max_autotune_gemm?)")
    print(f"{'GEMM':62s} {'choices':>7s} {'cuBLAS ms':>10s} {'template ms':>11s}  winner")
    for r in rows:
        cub = f"{r['cublas_ms']:.4f}" if r["cublas_ms"] is not None else (
            f">{r['cublas_above_ms']:.4f}" if r["cublas_above_ms"] is not None else "-")
        tpl = f"{r['template_ms']:.4f}" if r["template_ms"] is not None else "-"
        n = "?" if r["num_choices"] is None else str(r["num_choices"])
        print(f"{r['gemm'][:62]:62s} {n:>7s} {cub:>10s} {tpl:>11s}  {r['winner']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

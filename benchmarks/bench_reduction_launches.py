"""Time inductor's persistent-reduction kernels at their own launch and at other launches (issue 8).

Inductor picks each persistent reduction's launch (rows per program `XBLOCK`, warps per program) by a heuristic;
for rows of 256-1,024 columns it picks one warp. This script takes the kernels inductor wrote for a real
compiled step, from an inductor cache directory compiled with `TORCHINDUCTOR_BENCHMARK_KERNEL=1` (each kernel
file then carries `get_args()`, random inputs of the kernel's real shapes and strides), and launches every
selected kernel directly through Triton at its own launch and at each (XBLOCK, warps) of `--grid`, timed with
CUDA events in one process. It prints a table (kernel, rows x columns, traffic, own launch and time, best launch
and time, registers and spills, inductor's reduction count, and the launch and time under the product's rule,
`ofer/reduction_launch.py`) and writes JSON. Traffic counts the whole of each tensor argument once: GB/s is too low
for a kernel that reads an argument more than once, and too high for one that reads a slice of a larger buffer
(IdGen's forward norm kernels, `split_with_sizes` in their names, show ~7.8 TB/s, above an H200's memory rate).
Compile the cache with inductor's own launches (`--reduction-launch inductor`; the trainer's
default rule would otherwise have changed some launches already, and "own" would not be inductor's):

    TORCHINDUCTOR_CACHE_DIR=/tmp/ic TORCHINDUCTOR_BENCHMARK_KERNEL=1 python benchmarks/bench_training.py \\
        --compile --graph-only --no-idrank --jobs idgen --rows 65536 --optimizer flat --pad-widths true \\
        --reduction-launch inductor
    python benchmarks/bench_reduction_launches.py --cache /tmp/ic --min-rows 65536 --json out.json

A kernel whose file cannot be loaded or launched is reported as an error row; the others still run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ofer.reduction_launch import kernel_hints, relaunch_for  # noqa: E402

MARKER = "@triton_heuristics.persistent_reduction("


def parse_grid(spec: str) -> list[tuple[int, int]]:
    """"XBLOCKS:WARPS" (each a '/'-separated list of powers of two), e.g. "1/2/4:1/2/4/8" -> every pair."""
    xs, sep, ws = spec.partition(":")
    if not sep:
        raise ValueError(f"--grid {spec!r}: expected XBLOCKS:WARPS, e.g. 1/2/4:1/2/4/8")
    out = []
    try:
        xb = [int(v) for v in xs.split("/")]
        nw = [int(v) for v in ws.split("/")]
    except ValueError:
        raise ValueError(f"--grid {spec!r}: XBLOCKS and WARPS must be '/'-separated integers") from None
    for v in xb + nw:
        if v < 1 or v & (v - 1):
            raise ValueError(f"--grid {spec!r}: {v} is not a power of two >= 1")
    for x in xb:
        out.extend((x, w) for w in nw)
    return out


def find_kernel_files(cache: Path) -> list[Path]:
    """Inductor kernel files under `cache` that hold one persistent reduction and a benchmark harness."""
    if not cache.is_dir():
        raise FileNotFoundError(f"--cache {cache}: not a directory (an inductor cache, TORCHINDUCTOR_CACHE_DIR)")
    files = []
    for path in sorted(cache.rglob("*.py")):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if text.count(MARKER) == 1 and "def get_args(" in text:
            files.append(path)
    return files


def rule_launch(source_code: str, own: tuple[int, int]) -> tuple[str, int | None]:
    """The launch ("XBLOCKxWARPS") the product's rule (ofer/reduction_launch.py) gives a kernel whose source is
    `source_code` and whose own launch is `own`, and inductor's reduction count (None where the source has none)."""
    size_hints, reductions = kernel_hints(source_code)
    new = relaunch_for(size_hints, [own], reductions) if size_hints is not None else None
    xblock, warps = new if new is not None else own
    return f"{xblock}x{warps}", reductions


def traffic_bytes(args) -> int:
    """Bytes of the distinct tensor arguments (each counted once)."""
    import torch

    seen, total = set(), 0
    for a in args:
        if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() not in seen:
            seen.add(a.untyped_storage().data_ptr())
            total += a.numel() * a.element_size()
    return total


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_ofer_reduction_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tuners = [v for k, v in vars(mod).items() if k.startswith("triton_") and hasattr(v, "fn") and hasattr(v, "configs")]
    if len(tuners) != 1:
        raise ValueError(f"{path}: expected one inductor kernel object, found {len(tuners)}")
    return mod, tuners[0]


def _time_launch(fn, args, names, xnumel, xblock, warps, stages, reps: int) -> tuple[float, int, int]:
    from bench_gemm_widths import time_us

    kw = {"XBLOCK": xblock} if "XBLOCK" in names else {}
    grid = (math.ceil(xnumel / xblock), 1, 1)
    ck = fn[grid](*args, **kw, num_warps=warps, num_stages=stages)

    def launch() -> None:
        fn[grid](*args, **kw, num_warps=warps, num_stages=stages)

    us = statistics.median(time_us(launch, reps) for _ in range(3))
    return us, int(getattr(ck, "n_regs", -1)), int(getattr(ck, "n_spills", -1))


def sweep(path: Path, grid: list[tuple[int, int]], *, min_rows: int, min_cols: int, max_cols: int,
          reps: int) -> dict | None:
    """One kernel's row (None when its shape is outside the filters)."""
    mod, tuner = _load(path)
    fn = tuner.fn  # the JITFunction
    names = list(fn.arg_names)
    args = mod.get_args()
    if "xnumel" not in names or "r0_numel" not in names:
        raise ValueError(f"{path}: kernel arguments {names} lack xnumel / r0_numel")
    xnumel, rnumel = int(args[names.index("xnumel")]), int(args[names.index("r0_numel")])
    if xnumel < min_rows or not min_cols <= rnumel <= max_cols:
        return None
    own = tuner.configs[0]
    own_x, own_w, own_s = int(own.kwargs.get("XBLOCK", 1)), int(own.num_warps), int(own.num_stages)
    nbytes = traffic_bytes(args)
    launches = {}
    for xblock, warps in [(own_x, own_w)] + [p for p in grid if p != (own_x, own_w)]:
        try:
            us, regs, spills = _time_launch(fn, args, names, xnumel, xblock, warps, own_s, reps)
            launches[f"{xblock}x{warps}"] = {"us": us, "regs": regs, "spills": spills}
        except Exception as e:  # noqa: BLE001 -- one launch the compiler refuses must not stop the sweep
            launches[f"{xblock}x{warps}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
    ok = {k: v for k, v in launches.items() if "us" in v}
    if not ok:
        raise ValueError(f"{path}: no launch ran; own launch {own_x}x{own_w}: {launches[f'{own_x}x{own_w}']['error']}")
    best = min(ok, key=lambda k: ok[k]["us"])
    own_key = f"{own_x}x{own_w}"
    rule, reductions = rule_launch(path.read_text(), (own_x, own_w))
    name = getattr(getattr(fn, "fn", None), "__name__", None) or path.stem
    return {"kernel": name, "file": str(path),
            "rows": xnumel, "cols": rnumel, "bytes": nbytes, "own": own_key, "best": best,
            "own_us": ok.get(own_key, {}).get("us"), "best_us": ok[best]["us"], "reductions": reductions,
            "rule": rule, "rule_us": ok.get(rule, {}).get("us"), "launches": launches}


def sum_line(rows: list[dict]) -> str:
    """The table's last line: each kernel's time summed at its own launch, its best launch and the product's rule
    (nan, with a note, when a kernel's rule launch was not among those timed)."""
    own = sum(r["own_us"] or 0.0 for r in rows)
    best = sum(r["best_us"] for r in rows)
    rule = sum(r["rule_us"] if r["rule_us"] is not None else float("nan") for r in rows)
    note = " (nan: a rule launch outside --grid)" if math.isnan(rule) else ""
    return (f"sum over kernels (one launch each): own {own:.1f} us, best {best:.1f} us, product's rule "
            f"{rule:.1f} us{note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True, help="inductor cache dir (TORCHINDUCTOR_CACHE_DIR)")
    ap.add_argument("--grid", default="1/2/4/8:1/2/4/8/16", help="XBLOCKS:WARPS launches to try")
    ap.add_argument("--min-rows", type=int, default=1)
    ap.add_argument("--min-cols", type=int, default=257)
    ap.add_argument("--max-cols", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    grid = parse_grid(args.grid)
    files = find_kernel_files(args.cache)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_reduction_launches.py needs a CUDA GPU")
    rows, errors = [], []
    for path in files:
        try:
            row = sweep(path, grid, min_rows=args.min_rows, min_cols=args.min_cols, max_cols=args.max_cols,
                        reps=args.reps)
        except Exception as e:  # noqa: BLE001 -- one bad kernel file must not stop the rest
            errors.append({"file": str(path), "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        if row is not None:
            rows.append(row)
    rows.sort(key=lambda r: -(r["own_us"] or 0))
    print(f"{len(files)} persistent-reduction files, {len(rows)} in range, {len(errors)} errors; "
          f"card {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'kernel':60s} {'rows x cols':>12s} {'MB':>6s} {'red':>3s} {'own':>6s} {'us':>7s} {'GB/s':>6s}"
          f" {'regs/spill':>10s} {'best':>6s} {'us':>7s} {'GB/s':>6s} {'regs/spill':>10s} {'rule':>6s} {'us':>7s}")
    for r in rows:
        o, b = r["launches"].get(r["own"], {}), r["launches"][r["best"]]
        own_us = r["own_us"] or float("nan")
        rule_us = r["rule_us"] if r["rule_us"] is not None else float("nan")
        red = "-" if r["reductions"] is None else str(r["reductions"])
        print(f"{r['kernel'][:60]:60s} {r['rows']:>6d} x {r['cols']:<4d} {r['bytes'] / 1e6:6.0f} {red:>3s}"
              f" {r['own']:>6s} {own_us:7.1f} {r['bytes'] / own_us / 1e3:6.0f}"
              f" {o.get('regs', -1):>5d}/{o.get('spills', -1):<4d}"
              f" {r['best']:>6s} {r['best_us']:7.1f} {r['bytes'] / r['best_us'] / 1e3:6.0f}"
              f" {b['regs']:>5d}/{b['spills']:<4d} {r['rule']:>6s} {rule_us:7.1f}")
    print(sum_line(rows))
    for e in errors:
        print(f"error: {e['file']}: {e['error']}")
    if args.json:
        args.json.write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "grid": args.grid, "rows": rows, "errors": errors}, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark-only override of inductor's launch for persistent reductions over 257-1,024 columns (issue 8).

Put this directory first on PYTHONPATH and set OFER_PR_LAUNCH="XBLOCK,WARPS"; Python imports it at start-up in
every process, inductor's compile workers included. It wraps torch 2.11's
`triton_heuristics._persistent_reduction_configs` so that each such reduction (x size hint >= 4,096) gets one
launch, `XBLOCK` rows per program with `WARPS` warps, and appends one line per kernel to OFER_PR_LOG (default
/tmp/pr_patch.log) so a run shows it applied. Use a fresh TORCHINDUCTOR_CACHE_DIR per process. BENCHMARKS.md,
"Session of 2026-11-29":

    PYTHONPATH=benchmarks/reduction_launch:$PYTHONPATH OFER_PR_LAUNCH=1,1 TORCHINDUCTOR_COMPILE_THREADS=1 \\
      TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/bench_training.py --compile --graph-only \\
      --no-idrank --jobs idgen --rows 65536 --optimizer flat --pad-widths true --reduction-launch inductor

(`--reduction-launch inductor` since the package's own rule became the default: it would otherwise turn an
`OFER_PR_LAUNCH=2,1` launch into one row per warp; session 29's runs predate that option.)

Not used by the package; does nothing without OFER_PR_LAUNCH; with it, imports `ofer.reduction_launch` (the
package installed or on PYTHONPATH, as for the benchmarks). The package's form of the one-row-per-warp launch
is `ofer/reduction_launch.py` (`trainer.reduction_launch=one_row`, `--reduction-launch` of the training benchmarks);
this file stays for other (XBLOCK, WARPS) experiments.
"""
import os

_spec = os.environ.get("OFER_PR_LAUNCH")
if _spec:
    import torch
    import torch._inductor.runtime.triton_heuristics as _th

    _log = os.environ.get("OFER_PR_LOG", "/tmp/pr_patch.log")
    try:
        _x, _w = (int(v) for v in _spec.split(","))
    except ValueError:
        raise SystemExit(f"OFER_PR_LAUNCH={_spec!r}: expected XBLOCK,WARPS, e.g. 1,1") from None
    _orig = getattr(_th, "_persistent_reduction_configs", None)
    if _orig is None:
        raise SystemExit(f"OFER_PR_LAUNCH: torch {torch.__version__} has no "
                         "triton_heuristics._persistent_reduction_configs to override")
    import triton

    from ofer.reduction_launch import reduction_numel

    def _patched(size_hints, reduction_hint=False, inductor_meta=None, triton_meta=None, *a, **k):
        configs = _orig(size_hints, reduction_hint, inductor_meta, triton_meta, *a, **k)
        r = reduction_numel(size_hints)
        if not (256 < r <= 1024 and size_hints.get("x", 0) >= 4096):
            return configs
        name = (inductor_meta or {}).get("kernel_name", "?")
        with open(_log, "a") as f:
            f.write(f"pid {os.getpid()} {name} r={r} {[(c.kwargs, c.num_warps) for c in configs]} -> {_x}x{_w}\n")
        c = configs[0]
        return [triton.Config({**c.kwargs, "XBLOCK": _x}, num_warps=_w, num_stages=c.num_stages)]

    _th._persistent_reduction_configs = _patched
    with open(_log, "a") as f:
        f.write(f"pid {os.getpid()}: patched\n")

"""One row per warp for inductor's persistent reductions of 257-512 columns (issue 8, training step).

Our denoisers' norms reduce over 300-304 channels (IdGen). Inductor compiles each such norm (with the FiLM, SiLU and
residual arithmetic around it, and in the backward graph the RMS-norm and GroupNorm/SiLU gradients together) into a
persistent reduction, and for rows of 257-512 columns (a reduction size hint of 512) its CUDA heuristic launches
two rows per program with one warp (XBLOCK 2, num_warps 1; torch 2.11's `_persistent_reduction_configs`, "INNER"
reductions with at least 1,024 rows). The large backward kernels (11 loads, 3 stores, 4 reductions) then need
186-255 registers per thread and run 1.5-1.7x slower than with one row per program. Measured on an H200 with the
15 such kernels of the IdGen step at 65,536 rows, each launched alone (`benchmarks/bench_reduction_launches.py`,
BENCHMARKS.md, "Session of 2026-11-29"): 1,656 us per step at inductor's launch, 1,359 us with one row and one
warp each; the forward norm kernels (2 reductions each) are 7-9 us faster at inductor's launch, hence
`MIN_REDUCTIONS`. The whole compiled step in one CUDA graph with this module (H200, alternating processes,
BENCHMARKS.md "Session of 2026-11-29, third"): 20.49 -> 19.95-20.33 ms (20.12-20.23 ms relaunching all 15 kernels: no
difference that separate processes resolve); the training loop 20.31-20.56 -> 20.10-20.22 ms.

`one_row_per_warp()` is a context manager that, while active, wraps inductor's heuristic so that a reduction which
it would launch as one config of XBLOCK 2 and 1 warp, with a reduction size hint of 512, at least `MIN_ROWS` rows
(hint) and at least `MIN_REDUCTIONS` (3) reductions in the kernel (inductor's count: the backward norm kernels; the
forward ones, with 2, are faster at inductor's launch), gets XBLOCK 1 and 1 warp instead: the same kernel code, only
its launch changes (results equal up to the order of float additions within a row). Nothing else is touched.
Inductor runs its heuristics where it compiles Triton kernels, by default in a pool of worker processes that do not
see the wrapper, so the context also wraps `AsyncCompile.triton`: a persistent reduction whose size hints and
reduction count (read from its source) match is compiled in this process (`compile_threads=1` for that call), every
other kernel as before. For the IdGen loss that is 8 kernels (15 before the reduction count was part of the rule),
and first compilations take no measurably longer (H200 machine, 16 cores: bare-step benchmark processes 66 and 74 s
against 63 and 67 s without the module; with every kernel compiled in this process, 99 s against 49 s). Kernels
inductor takes from its caches (a warm FX graph cache, a kernel compiled earlier in the process) keep the launch
they were compiled with. It yields a list to which each changed kernel adds one `Relaunch` record. On a torch
without the heuristic function (`triton_heuristics._persistent_reduction_configs`, present in 2.11-2.14) the context
changes nothing and yields None; without `AsyncCompile.triton` it compiles every kernel in this process. The trainer
enters it for compiled CUDA runs (`trainer.reduction_launch=one_row`, the default).
"""
from __future__ import annotations

import ast
import contextlib
import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MIN_REDUCTIONS", "MIN_ROWS", "REDUCTION_HINT", "Relaunch", "kernel_hints", "may_relaunch",
           "one_row_per_warp", "reduction_numel", "relaunch_for", "wrap_heuristic", "wrap_triton_compile"]

# The reduction size hint whose launch we change (inductor rounds a row of 257-512 columns up to 512). Rows of
# 513-1,024 columns inductor already launches with XBLOCK 1 and 1 warp; narrower rows were not measured.
REDUCTION_HINT = 512
# Fewest rows (inductor's x size hint) for which the change applies; measured at 65,536 rows only. Inductor's own
# two-rows-per-warp choice needs >= 1,024 rows.
MIN_ROWS = 4096
_INDUCTOR_LAUNCH = (2, 1)  # (XBLOCK, num_warps) that inductor picks here
_ONE_ROW = (1, 1)
# Fewest reductions in one kernel (inductor's `num_reduction`) for which the change applies. Measured per kernel
# (H200, 65,536 x 304, BENCHMARKS.md "Session of 2026-11-29"): the forward norm kernels with 2 reductions run
# 82-84 us at inductor's launch and 90-91 us at one row per warp; the backward ones with 3-4 reductions (168-255
# registers per thread at two rows per warp) 71-219 us against 63-132 us.
MIN_REDUCTIONS = 3
# the persistent-reduction decorator's size hints in a generated kernel's source (inductor reads them the same way),
# and the reduction count in its inductor_meta (a dict literal only in part: it can hold `set()`)
_SIZE_HINTS = re.compile(r"size_hints=(\{.*?\})")
_NUM_REDUCTION = re.compile(r"""['"]num_reduction['"]\s*:\s*(\d+)""")


@dataclass(frozen=True)
class Relaunch:
    """One kernel whose launch `one_row_per_warp` changed: (XBLOCK, num_warps) before and after; its loads and
    reductions as inductor counted them (None where its metadata has no count)."""

    kernel: str
    rows: int
    columns: int
    before: tuple[int, int]
    after: tuple[int, int]
    loads: int | None = None
    reductions: int | None = None


def reduction_numel(size_hints: Mapping[str, int]) -> int:
    """Product of the reduction dimensions' size hints (keys "r", "r0_", "r1_", ... by torch version)."""
    n = 1
    for key, value in size_hints.items():
        if key.startswith("r"):
            n *= int(value)
    return n


def relaunch_for(size_hints: Mapping[str, int], launches: Sequence[tuple[int, int]],
                 reductions: int | None = None) -> tuple[int, int] | None:
    """The (XBLOCK, num_warps) to launch a persistent reduction with instead of `launches` (inductor's configs as
    (XBLOCK, num_warps) pairs), or None to keep inductor's choice. Changes only the one case measured: a single
    config of XBLOCK 2 and 1 warp, reduction hint `REDUCTION_HINT`, at least `MIN_ROWS` rows, and at least
    `MIN_REDUCTIONS` reductions in the kernel (`reductions`, inductor's count; None: not known, changed)."""
    if len(launches) != 1 or tuple(launches[0]) != _INDUCTOR_LAUNCH:
        return None
    if reduction_numel(size_hints) != REDUCTION_HINT or int(size_hints.get("x", 0)) < MIN_ROWS:
        return None
    if reductions is not None and int(reductions) < MIN_REDUCTIONS:
        return None
    return _ONE_ROW


def kernel_hints(source_code: str) -> tuple[dict[str, int] | None, int | None]:
    """A generated persistent reduction's size hints and reduction count (inductor's `num_reduction`), read from
    its source as inductor writes it (torch 2.11-2.14); None for what the source does not state as a literal."""
    if "persistent_reduction(" not in source_code:
        return None, None
    size_hints = None
    match = _SIZE_HINTS.search(source_code)
    if match is not None:
        try:
            size_hints = ast.literal_eval(match.group(1))
        except (ValueError, SyntaxError):
            size_hints = None
    count = _NUM_REDUCTION.search(source_code)
    return (size_hints if isinstance(size_hints, dict) else None), (None if count is None else int(count.group(1)))


def may_relaunch(source_code: str) -> bool:
    """Whether a generated Triton kernel (its source, as inductor hands it to `AsyncCompile.triton`) is a persistent
    reduction whose size hints and reduction count `relaunch_for` could change: it must then be compiled where the
    wrapper runs."""
    size_hints, reductions = kernel_hints(source_code)
    if size_hints is None:
        return False
    try:
        return relaunch_for(size_hints, [_INDUCTOR_LAUNCH], reductions) is not None
    except (TypeError, ValueError):  # a hint that is not a number: leave it to inductor
        return False


def wrap_triton_compile(original, inductor_config):
    """`AsyncCompile.triton(self, kernel_name, source_code, ...)` compiling the kernels `may_relaunch` selects in
    this process (`inductor_config.compile_threads` 1 for that call) and every other one as `original` does."""

    def triton(self, kernel_name, source_code, *args: Any, **kwargs: Any):
        if isinstance(source_code, str) and may_relaunch(source_code):
            with inductor_config.patch(compile_threads=1):
                return original(self, kernel_name, source_code, *args, **kwargs)
        return original(self, kernel_name, source_code, *args, **kwargs)

    triton.__wrapped__ = original
    return triton


def wrap_heuristic(original, records: list[Relaunch]):
    """`original` (inductor's `_persistent_reduction_configs(size_hints, reduction_hint, inductor_meta,
    triton_meta)`, returning a list of triton Configs) with `relaunch_for` applied to its result."""

    def persistent_reduction_configs(size_hints, reduction_hint=False, inductor_meta=None, triton_meta=None,
                                     *args: Any, **kwargs: Any):
        configs = original(size_hints, reduction_hint, inductor_meta, triton_meta, *args, **kwargs)
        try:
            launches = [(int(c.kwargs.get("XBLOCK", 0)), int(c.num_warps)) for c in configs]
        except (AttributeError, TypeError, ValueError):  # not the configs this rule knows: leave them
            return configs
        meta = inductor_meta or {}
        count = meta.get("num_reduction")
        count = count if isinstance(count, int) else None
        new = relaunch_for(size_hints, launches, count)
        if new is None:
            return configs
        config = copy.copy(configs[0])
        config.kwargs = {**configs[0].kwargs, "XBLOCK": new[0]}
        config.num_warps = new[1]
        records.append(Relaunch(kernel=str(meta.get("kernel_name", "?")), rows=int(size_hints.get("x", 0)),
                                columns=reduction_numel(size_hints), before=launches[0], after=new,
                                loads=meta.get("num_load"), reductions=count))
        return [config]

    persistent_reduction_configs.__wrapped__ = original
    persistent_reduction_configs.relaunch_records = records
    return persistent_reduction_configs


@contextlib.contextmanager
def one_row_per_warp() -> Iterator[list[Relaunch] | None]:
    """While active, inductor launches its 257-512-column persistent reductions (>= `MIN_ROWS` rows) with one row
    per program and one warp, and compiles those kernels in this process. Yields the list of changed kernels (None
    where this torch has no heuristic to wrap). A process-wide patch: entered again while active (any thread), it
    changes nothing more and yields the active one's list."""
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.runtime import triton_heuristics
    except ImportError:  # a torch without inductor
        yield None
        return
    original = getattr(triton_heuristics, "_persistent_reduction_configs", None)
    if original is None or not callable(original):
        yield None
        return
    active = getattr(original, "relaunch_records", None)
    if active is not None:
        yield active
        return
    try:
        from torch._inductor.async_compile import AsyncCompile
    except ImportError:
        AsyncCompile = None  # noqa: N806 -- the class, when this torch has it
    compile_triton = getattr(AsyncCompile, "triton", None) if AsyncCompile is not None else None
    records: list[Relaunch] = []
    with contextlib.ExitStack() as stack:
        triton_heuristics._persistent_reduction_configs = wrap_heuristic(original, records)
        stack.callback(setattr, triton_heuristics, "_persistent_reduction_configs", original)
        if callable(compile_triton):
            AsyncCompile.triton = wrap_triton_compile(compile_triton, inductor_config)
            stack.callback(setattr, AsyncCompile, "triton", compile_triton)
        else:  # no per-kernel hook: every kernel in this process
            stack.enter_context(inductor_config.patch(compile_threads=1))
        yield records

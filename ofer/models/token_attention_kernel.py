"""Triton kernels for OFER's token attention after the q/k/v projection (forward and backward).

`TokenSelfAttention` projects a row into T tokens of (q, k, v) for H heads of size Dh, attends over the T
tokens and mixes them into one vector with learned weights w (T,). This kernel takes the projection output
(R, T * 3 * H * Dh), laid out (token, q/k/v, head, channel) as the Linear writes it, and returns, per row and
head,

    pooled[r, h] = sum_t w_t sum_u softmax_u(q_rth . k_ruh / sqrt(Dh)) v_ruh = sum_u c_ruh v_ruh,
    c_ruh = sum_t w_t a_rthu,

reading each q/k/v element once and writing only (R, H * Dh) float32: no permuted copies, no (T, T) matrices in
memory, no batched 16 x 16 matmuls (which took 45% of a compiled IdGen sampling step on an H200,
BENCHMARKS.md). Scores and softmax are float32.

How: per program (block of `LAUNCH["block_rows"]` rows, head), q, k, v are (rows, T, Dh) tiles, the rows a
batch dimension, and the scores one batched tensor-core `tl.dot` of (T, Dh) @ (Dh, T) per row (T >= 16 and
Dh >= 16 for `tl.dot`). Each program loops over `LAUNCH["tiles"]` consecutive row blocks of one head,
software-pipelined over `LAUNCH["stages"]` stages, with `LAUNCH["num_warps"]` warps. Programs are numbered
head-fastest (`LAUNCH["order"]`): the H programs of a row block run side by side and share each 128-byte line of
q/k/v (two heads' 32 channels of a token) in L2.

Backward (`token_attention_pool` is differentiable w.r.t. qkv and w): one kernel with the same tiles (launch:
`BACKWARD_LAUNCH`) recomputes the scores from q/k/v and writes dL/dqkv and per-program partial sums of dL/dw
(summed on the host: deterministic). Nothing but qkv is kept for the backward.

History, measured on an H200 (BENCHMARKS.md; `benchmarks/bench_token_attention.py`, `bench_training.py`): the
first tensor-core version stacked 4 rows x 16 tokens into one (64, Dh) tile with one 64 x 64 score product and
masked the cross-row scores (4x more scores computed and exponentiated than needed): 132 us per call at 25,600
rows against 551 us for the compiled fused-reduction form, 928 us for compiled explicit math, 1,300 us eager (a
version with CUDA-core broadcast products took 868 us); a compiled IdGen sampling step went from 6.6 to 4.4 ms,
ExpGen from 4.9 to 2.7 ms. Its backward took a compiled bf16 IdGen training step at 65,536 rows from 0.0628 s
with the PyTorch "math" form (cuBLAS batched 16 x 16 matmuls and permuted copies: 57% of the step) to 0.0301 s.
Head-fastest programs: backward 808 -> 610 us at 65,536 rows, IdGen training step 28.3 -> 27.1 ms. The batched
tiles (current; the stacked kernels were removed after the comparison, see commit f907576): forward 318 -> 249
us, backward 610 -> 445 us, IdGen training step 26.5 -> 25.1 ms, paper-setting pipeline 48.7 -> 49.4 images/s.

`token_attention_project_pool` does the q/k/v projection inside the kernel too, for attention inputs of at most
`PROJECT_MAX_WIDTH` (64) channels: per program (32 rows, head) the rows' q, k, v of all T tokens are three
(32, C) @ (C, T * Dh) tensor-core products, the scores one batched (T, Dh) @ (Dh, T) product per row, so the
(R, T * 3 * H * Dh) q/k/v tensor (6,144 values per row, up to 614x the input) is never written and read back.
Measured on an H200 at 51,200 rows (bf16; `bench_token_attention.py --widths`), against the cuBLAS projection
followed by `token_attention_pool`: 228 vs 588 us at 10 channels, 283 vs 655 at 25, 445 vs 770 at 53 (492 with
the projection's K padded to a multiple of 8 for cuBLAS). A compiled sampling step went from 7.78 to
7.46 ms (IdGen) and 4.16 to 3.61 ms (ExpGen). The wide (300-channel) IdGen blocks keep the separate projection:
their 3.7 MB of q/k/v weights would be re-read by every 32-row block (5.9 GB per call at 51,200 rows).
It is differentiable (`token_attention_project_pool_backward`: q/k/v recomputed from x per 16-32 rows, dL/dqkv
written, dx and dW as two cuBLAS matmuls of it). With its first, Triton forward it trained slower than the separate
projection (H200, forward + backward at 65,536 rows: 2.98 vs 2.95 ms at 53 channels, 1.59 vs 1.88 ms at 10; a
compiled IdGen step 28.5 vs 27.1 ms); with the Gluon forward below it is faster up to 32 channels on an H100, so
`Denoiser` trains inputs up to `PROJECT_TRAINING_MAX_WIDTH` (32) channels through it (BENCHMARKS.md, "ninth"); on an
H200 only up to 16 (`CARD_PROJECT_TRAINING_MAX_WIDTH`: there the 32-channel block trains faster separately).
Computing dx inside the backward kernel as well (three more (rows, 512) @ (512, C) products per head, no second
read of dqkv) was slower on an H100 in two forms, so dx stays a cuBLAS matmul: per-head float32 partials (spilled
registers; 16 channels: 1,637-2,500 vs 1,382 us per launch; BENCHMARKS.md "ninth", commit 23f7119), and one
program per row block over all heads (no spills, 4x fewer programs; compiled bf16 steps: ExpGen 15.21 -> 16.27 ms
at 32 channels, IdGen 23.96 -> 25.32 ms at 16; BENCHMARKS.md "Session of 2026-11-28, second", commit 3712be2).

For bf16/fp16 inputs with 16 tokens of 32 channels on a CUDA GPU the projecting op runs a Gluon kernel
(`_project_pool_gluon_kernel`; Gluon is Triton's dialect with explicit layouts, Triton >= 3.5) instead: the same
function and roundings, but q and k are staged for the score product in a shared-memory layout written out here
(`_staging_bases`), whose XOR swizzle by token and row bits leaves neither the projection's stores nor the score
product's loads with bank conflicts. Triton's own staging for the `tl.dot` form put the rows before the tokens,
so every ldmatrix of the score product was an 8-way conflict (77% of the shared-memory wavefronts, ncu on an
H100). Measured on an H100 at 51,200 rows: 130 vs 223 us at 10 channels, 184 vs 276 at 25, 274 vs 460 at 53;
paper-setting pipeline 46.5 -> 51.9 images/s, DDIM-25 2,007 -> 2,282 (BENCHMARKS.md, "sixth" session). Its
weights come as fragments stored in the order of the mma operand's registers (`PROJECT_WEIGHT_FRAGMENTS`,
`_weight_fragments`): coalesced 16-byte loads permuted into the operand layout without shared memory, where the
row-major blocks went through shared memory in every program (ncu: L1/shared memory 82% busy); at 51,200 rows
on an H100 10, 25 and 56 channels 129 -> 107, 181 -> 133, 264 -> 193 us (BENCHMARKS.md, "Session of 2026-11-27,
fourth").
`PROJECT_KERNEL = "triton"` selects the Triton kernel again (float32 inputs, other shapes and the interpreter
always take it).

`attention_output` ends an attention block in sampling: x + pooled @ W.T + b (the output map, its bias and the
residual add) as one kernel that reads the pooled output and x once and rounds once, where cuBLAS's Linear wrote
its output for a separate add kernel (at 51,200 rows and 304 columns on an H100: 38 vs 66-70 us). With
`CAT_OUTPUT` (on by default) it also writes the concatenation that follows in the U-Net's up path, and serves
the up MLPs' output Linear (no residual) for the same purpose.

All are `torch.library` custom ops, so `torch.compile` and CUDA graphs treat each as one call.
Triton is optional: `available(x, head_dim)` says whether the op can run on `x` (Triton importable, a CUDA
tensor or TRITON_INTERPRET=1 for the CPU interpreter used in our tests, head_dim >= 16 for `tl.dot`); the ops
take T >= 16 tokens; otherwise `Denoiser` uses its PyTorch forms. On GPUs below compute capability 8.0 the ops
compute in PyTorch.
"""
from __future__ import annotations

import functools
import os

import torch

__all__ = ["attention_output", "attention_output_reference", "available", "prepare_project_weight", "project_layout",
           "projects", "token_attention_pool", "token_attention_pool_backward", "token_attention_pool_reference",
           "token_attention_project_pool", "token_attention_project_pool_backward"]

try:  # Triton is an optional dependency (shipped with CUDA builds of torch)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
try:  # Gluon, Triton's explicit-layout dialect (Triton >= 3.5): the projecting kernel's conflict-free form
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2 as _mma_v2

    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier  # renamed in Triton 3.7
except (ImportError, AttributeError):  # pragma: no cover - depends on the installation
    gluon = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Launch shape: row blocks per program (a software-pipelined loop), pipeline stages, warps per program.
# Module-level so benchmarks/bench_token_attention.py can sweep it; see the module docstring for the choice.
# block_rows: rows per tile (the batch dimension of one (rows, T, Dh) tile).
# order: which program index varies fastest, "head" (the H programs of one row block run side by side, so each
# 128-byte line of q/k/v, two heads' 32 channels of one token, is used from L2 by both) or "row" (all row
# blocks of head 0 first, then head 1, ...).
# Measured on an H200 at 65,536 rows (`bench_token_attention.py`): forward 249 us (2x4x2x2), backward 445 us
# (4x2x2x4); see the module docstring. Forward re-measured on an H100 at 51,200 rows (BENCHMARKS.md, "Session of
# 2026-11-27, fifth"): 2x2x3x2 240 us, 2x4x2x2 280 us (2x2x2x2 248, 2x1x3x2 242; one program doing all 4 heads
# of its rows, 2x2x2x2, 240 us: not kept).
LAUNCH = {"block_rows": 2, "tiles": 2, "stages": 3, "num_warps": 2, "order": "head"}
# The backward kernel's launch, same fields.
BACKWARD_LAUNCH = {"block_rows": 4, "tiles": 2, "stages": 2, "num_warps": 4, "order": "head"}
# Launches measured faster on one card, keyed by a substring of its name (torch.cuda.get_device_name): the kernels
# use them there while LAUNCH / BACKWARD_LAUNCH hold their defaults above and `set_launch` was not called
# (`current_launch`). H200 (BENCHMARKS.md, "Session of 2026-11-28, third"; `bench_token_attention.py --rows 65536`,
# two calls): forward 2x4x3x2 254-256 us against 282-285 us for LAUNCH, backward 2x2x3x2 428 us against 446-449 us
# for BACKWARD_LAUNCH; a compiled bf16 IdGen training step 21.24-21.30 -> 21.00 ms. On an H100 the forward's sweep
# had LAUNCH fastest (2x4x2x2: 280 vs 240 us, "fifth"); these two launches were not timed on an H100.
CARD_LAUNCHES = {"H200": {"forward": {"block_rows": 2, "tiles": 4, "stages": 3, "num_warps": 2, "order": "head"},
                          "backward": {"block_rows": 2, "tiles": 2, "stages": 3, "num_warps": 2, "order": "head"}}}
_DEFAULT_LAUNCHES = {"forward": dict(LAUNCH), "backward": dict(BACKWARD_LAUNCH)}
# "forward" / "backward" once `set_launch` chose them, "project_training" once `set_project_training_max_width`
# did: used on every card
_SET_LAUNCHES: set[str] = set()
# The kernel with the projection inside (`token_attention_project_pool`): rows per program and warps, and the
# widest attention input it takes (wider inputs: the cuBLAS projection, then `token_attention_pool`).
# Per padded width (16, 32, 64 channels).
PROJECT_LAUNCH = {16: {"block_rows": 32, "num_warps": 4}, 32: {"block_rows": 32, "num_warps": 4},
                  64: {"block_rows": 32, "num_warps": 8}}
# The projecting kernel's backward (`token_attention_project_pool_backward`), per padded width: rows per program
# (a power of two >= 16) and warps.
# Measured on an H100 at 65,536 rows, bf16 forward + backward with the Gluon forward (`bench_token_attention.py
# --project-backward-launches`, BENCHMARKS.md "Session of 2026-11-27, ninth"): 16 x 8 fastest at 16 and 32
# channels (1,382 / 1,563 us; 16 x 4: 1,461 / 1,670). At 56 channels 32 x 8 was faster in bf16 (1,906 us; 16 x 8:
# 2,112) but needs 256 KB of shared memory in float32, more than an H100 has, so 64 keeps 16 rows.
PROJECT_BACKWARD_LAUNCH = {16: {"block_rows": 16, "num_warps": 8}, 32: {"block_rows": 16, "num_warps": 8},
                           64: {"block_rows": 16, "num_warps": 8}}
PROJECT_MAX_WIDTH = 64  # may be lowered (0: never); the kernel takes at most max(PROJECT_LAUNCH) = 64 channels
# The widest attention input whose projection runs inside the kernels in training too (with gradients, under
# bf16/fp16 autocast: the projecting op and its backward, `token_attention_project_pool_backward`); wider inputs,
# and every input in float32 training, train with the cuBLAS projection + `token_attention_pool`; 0: all do.
# Measured on an H100 at 65,536 rows, bf16 forward + backward of one block (BENCHMARKS.md, "ninth"): 1,382 vs
# 1,783 us at 16 channels, 1,563 vs 1,790 at 32, but 1,906 vs 1,821 at 56 (the backward re-reads a 56-channel
# block's 196 KB of q/k/v weights for every 16 rows); compiled bf16 training steps in one CUDA graph, 0 -> 32:
# IdGen 26.05 -> 25.66 ms, ExpGen 16.41 -> 15.59 ms. Benchmarks switch it (`bench_training.py` /
# `bench_trainer.py --project-training`); `project_training_max_width` gives the value used on a device.
PROJECT_TRAINING_MAX_WIDTH = 32
# PROJECT_TRAINING_MAX_WIDTH per card, keyed by a substring of its name (torch.cuda.get_device_name), used on that
# card while PROJECT_TRAINING_MAX_WIDTH holds its default (32) and `set_project_training_max_width` was not called.
# H200: the 32-channel block trains faster with the separate projection (bf16 forward + backward at 65,536 rows,
# `bench_token_attention.py --widths 16,32,56`: 1,391 vs 1,334 us; 16 channels 1,223 vs 1,357); ExpGen's compiled
# bf16 step (bare, one CUDA graph, 65,536 rows; three pairs of alternating processes) 12.57 / 12.69 / 12.79 ms at
# 32 against 12.43 / 12.35 / 12.56 ms at 16 (BENCHMARKS.md, "Session of 2026-11-29, fifth" point 5 and "sixth").
# IdGen is unaffected (its attention inputs are 300, 50 and 10 wide). On an H100 32 was faster ("ninth").
CARD_PROJECT_TRAINING_MAX_WIDTH = {"H200": 16}
_DEFAULT_PROJECT_TRAINING_MAX_WIDTH = PROJECT_TRAINING_MAX_WIDTH
# Which kernel the projecting op runs for bf16/fp16 inputs on a CUDA GPU with 16 tokens of 32 channels: "gluon"
# (q and k staged through shared memory in a layout without bank conflicts, see `_staging_bases`) or "triton"
# (`_project_pool_kernel`, whose staging layout Triton chooses; float32 inputs, other shapes and the CPU
# interpreter always take it). Benchmarks switch it (`--project-kernel`) to measure one against the other.
PROJECT_KERNEL = "gluon"
# The Gluon kernel's launch per padded width: rows per program (a power of two >= 16), warps, column chunks of
# the projection (1 or 2: fewer registers) and a register cap per thread (maxnreg, 0: none). Measured on an H100
# at 51,200 rows (bf16; BENCHMARKS.md): 32 rows x 4 warps fastest at every width (16 x 4, 32 x 8, 64 x 4, 64 x 8
# no faster); at 64 channels two chunks under a 168-register cap (3 programs per SM instead of 2) 274 vs 291 us,
# elsewhere within 3% of one chunk.
PROJECT_GLUON_LAUNCH = {16: {"block_rows": 32, "num_warps": 4, "chunks": 1, "maxnreg": 0},
                        32: {"block_rows": 32, "num_warps": 4, "chunks": 1, "maxnreg": 0},
                        64: {"block_rows": 32, "num_warps": 4, "chunks": 2, "maxnreg": 168}}
# Whether the Gluon kernel loads its weights as fragments stored in the mma operand's register order
# (`_weight_fragments`, `_gluon_weight`: no shared-memory round trip per weight block) rather than as row-major
# blocks converted through shared memory. Benchmarks switch it (`bench_token_attention.py --weight-fragments`).
PROJECT_WEIGHT_FRAGMENTS = True


def projects(width: int, training_dtype: torch.dtype | None = None, device: torch.device | None = None) -> bool:
    """Whether `TokenSelfAttention` sends an attention input of `width` channels to `token_attention_project_pool`:
    width <= PROJECT_MAX_WIDTH, capped at the widest padded width the kernel has a launch for. `training_dtype` is
    the autocast dtype of a forward that autograd records (`TokenSelfAttention` passes float32 without autocast;
    None: no gradients, e.g. sampling). Training also needs bf16 or fp16, where it was measured (the op's float32
    forms, Triton's forward rather than the Gluon one, were not measured in training), and width <=
    `project_training_max_width(device)` (the input's device; None: PROJECT_TRAINING_MAX_WIDTH)."""
    widest = min(PROJECT_MAX_WIDTH, max(PROJECT_LAUNCH))
    if training_dtype is None:
        return 1 <= width <= widest
    low = training_dtype in (torch.bfloat16, torch.float16)
    return low and 1 <= width <= min(widest, project_training_max_width(device))


def set_project_training_max_width(width: int) -> None:
    """Set PROJECT_TRAINING_MAX_WIDTH (0: every block trains with the separate projection); from then on it holds on
    every card, CARD_PROJECT_TRAINING_MAX_WIDTH included. Used by the benchmarks' --project-training. A model
    compiled before keeps the value it was traced with (call torch._dynamo.reset())."""
    global PROJECT_TRAINING_MAX_WIDTH
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise ValueError(f"PROJECT_TRAINING_MAX_WIDTH {width!r}: expected an integer >= 0 (channels; 0: never)")
    PROJECT_TRAINING_MAX_WIDTH = width
    _SET_LAUNCHES.add("project_training")


def project_training_max_width(device: torch.device | None = None) -> int:
    """The widest attention input trained through `token_attention_project_pool` on `device`: the card's entry of
    CARD_PROJECT_TRAINING_MAX_WIDTH on a CUDA device whose name contains its key, while PROJECT_TRAINING_MAX_WIDTH
    holds its default and `set_project_training_max_width` was not called; otherwise PROJECT_TRAINING_MAX_WIDTH.
    Constant for torch.compile (the card is looked up when the forward is traced, without a graph break)."""
    if (device is None or device.type != "cuda" or "project_training" in _SET_LAUNCHES
            or PROJECT_TRAINING_MAX_WIDTH != _DEFAULT_PROJECT_TRAINING_MAX_WIDTH):
        return PROJECT_TRAINING_MAX_WIDTH
    return _card_project_training_max_width(-1 if device.index is None else device.index)


@torch.compiler.assume_constant_result
def _card_project_training_max_width(index: int) -> int:
    return _card_entry(CARD_PROJECT_TRAINING_MAX_WIDTH, index, PROJECT_TRAINING_MAX_WIDTH)


def set_launch(spec: str, *, backward: bool = False) -> dict:
    """Set `LAUNCH` (`BACKWARD_LAUNCH` with backward=True) from "ROWSxTILESxSTAGESxWARPS[:ORDER]" (e.g.
    "2x4x2x2" or "2x4x2x2:row"), four positive integers and the program order "head" (the default) or "row";
    returns the new launch. Used by the benchmarks' --launches / --attention-launch / --backward-launches
    options."""
    shape, sep, order = spec.partition(":")
    parts = shape.split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts) or (sep and order not in ("head", "row")):
        raise ValueError(f"attention launch {spec!r}: expected rows x tiles x stages x warps, four positive "
                         "integers, optionally followed by ':head' or ':row', such as '2x4x2x2' or '2x4x2x2:row'")
    rows, tiles, stages, warps = (int(p) for p in parts)
    launch = BACKWARD_LAUNCH if backward else LAUNCH
    launch.update(block_rows=rows, tiles=tiles, stages=stages, num_warps=warps, order=order or "head")
    _SET_LAUNCHES.add("backward" if backward else "forward")
    return launch


def current_launch(device: torch.device, *, backward: bool = False) -> dict:
    """The launch the attention kernel (the backward kernel with backward=True) runs with on `device`: the card's
    entry of `CARD_LAUNCHES` on a CUDA device whose name contains its key, while `LAUNCH` (`BACKWARD_LAUNCH`) holds
    its default and `set_launch` was not called; otherwise `LAUNCH` (`BACKWARD_LAUNCH`) itself."""
    which = "backward" if backward else "forward"
    launch = BACKWARD_LAUNCH if backward else LAUNCH
    if device.type != "cuda" or which in _SET_LAUNCHES or launch != _DEFAULT_LAUNCHES[which]:
        return launch
    launches = _card_entry(CARD_LAUNCHES, -1 if device.index is None else device.index)
    return launch if launches is None else launches[which]


@functools.cache
def _card_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _card_entry(table: dict, index: int, default=None):
    """The value of the first key of `table` (CARD_LAUNCHES, CARD_PROJECT_TRAINING_MAX_WIDTH) that CUDA device
    `index`'s name contains (-1: the current device); `default` if none does."""
    name = _card_name(index if index >= 0 else torch.cuda.current_device())
    return next((value for key, value in table.items() if key in name), default)


def set_project_launch(spec: str, widths: tuple[int, ...] = (16, 32, 64), *, kernel: str = "triton") -> dict:
    """Set the launch of the padded `widths` in `PROJECT_LAUNCH` (kernel "triton") from "ROWSxWARPS" (e.g. "16x4"),
    or in `PROJECT_GLUON_LAUNCH` (kernel "gluon") from "ROWSxWARPS[xCHUNKS[xMAXNREG]]" (e.g. "32x4x2x168"): rows
    per program (a power of two >= 16), warps, column chunks of the projection (1 or 2) and a register cap per
    thread (0: none); returns the new launch table."""
    if kernel not in ("triton", "gluon"):
        raise ValueError(f"projecting attention kernel {kernel!r}: expected 'triton' or 'gluon'")
    parts = spec.split("x")
    n_ok = len(parts) == 2 or (kernel == "gluon" and len(parts) in (3, 4))
    ok = n_ok and all(p.isdigit() for p in parts) and all(int(p) > 0 for p in parts[:3])
    chunks, maxnreg = (int(parts[2]) if len(parts) > 2 and ok else 1), (int(parts[3]) if len(parts) > 3 and ok else 0)
    if not ok or int(parts[0]) < 16 or int(parts[0]) & (int(parts[0]) - 1) or chunks not in (1, 2):
        raise ValueError(f"projecting attention launch {spec!r}: expected rows x warps, rows a power of two >= 16 "
                         "and warps a positive integer, such as '16x4' (Gluon: optionally x chunks (1 or 2) "
                         "x register cap, such as '32x4x2x168')")
    launch = {"block_rows": int(parts[0]), "num_warps": int(parts[1])}
    table = PROJECT_LAUNCH
    if kernel == "gluon":
        launch.update(chunks=chunks, maxnreg=maxnreg)
        table = PROJECT_GLUON_LAUNCH
    for cp in widths:
        table[cp] = dict(launch)
    return table


def available(x: torch.Tensor, head_dim: int = 16) -> bool:
    """Whether `token_attention_pool` runs on tensors like `x` with this head size (Triton installed, a CUDA
    tensor or the interpreter, head_dim >= 16 for `tl.dot`). Only static properties, so torch.compile traces it
    without a graph break; on a GPU below compute capability 8.0 (no bf16 tensor cores) the op computes the same
    function in PyTorch instead of launching the kernel."""
    return triton is not None and head_dim >= 16 and (x.is_cuda or _INTERPRET)


if triton is not None:

    @triton.jit
    def _program_block_head(n_prog_r, H: tl.constexpr, HEAD_FASTEST: tl.constexpr):
        # The flat program index -> (row-block program, head) of a launch of n_prog_r * H programs, the head
        # varying fastest or slowest (LAUNCH["order"]). One grid axis: no 65,535 limit on the second.
        pid = tl.program_id(0)
        if HEAD_FASTEST:
            return pid // H, pid % H
        else:
            return pid % n_prog_r, pid // n_prog_r

    @triton.jit
    def _row_tile_attention(qkv_ptr, blk, R, stride_row, scale, h, T: tl.constexpr, H: tl.constexpr,
                            DH: tl.constexpr, BLOCK_R: tl.constexpr):
        # Shared by the forward and backward kernels: row block `blk` of head h as (BLOCK_R, T, DH) tiles of q, k, v
        # (the rows a batch dimension) and the softmax a (BLOCK_R, T, U) of the scores, one batched tensor-core
        # (T, DH) @ (DH, T) product per row. Returns the rows, the row mask, the (BLOCK_R, T, DH) offsets of q in
        # qkv (k and v follow at + H * DH and + 2 * H * DH), q, k, v as stored, and a.
        rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        offs = (rows.to(tl.int64)[:, None, None] * stride_row + tl.arange(0, T)[None, :, None] * (3 * H * DH)
                + h * DH + tl.arange(0, DH)[None, None, :])
        m = row_ok[:, None, None]
        q = tl.load(qkv_ptr + offs, mask=m, other=0.0)
        k = tl.load(qkv_ptr + offs + H * DH, mask=m, other=0.0)
        v = tl.load(qkv_ptr + offs + 2 * H * DH, mask=m, other=0.0)
        s = tl.dot(q, tl.trans(k, (0, 2, 1)), input_precision="ieee", out_dtype=tl.float32) * scale
        s = s - tl.max(s, axis=2)[:, :, None]
        e = tl.exp(s)
        a = e / tl.sum(e, axis=2)[:, :, None]
        return rows, row_ok, offs, q, k, v, a

    @triton.jit
    def _token_attention_pool_kernel(
        qkv_ptr, w_ptr, out_ptr, R, stride_row, scale, n_prog_r,
        T: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, BLOCK_R: tl.constexpr, TILES: tl.constexpr,
        STAGES: tl.constexpr, HEAD_FASTEST: tl.constexpr,
    ):
        # Program (TILES consecutive row blocks, head): per row block, pooled = sum_u c_u v_u with
        # c_u = sum_t w_t a_tu. The loop over the row blocks is software-pipelined (STAGES): the next block's loads
        # are in flight during this one's math.
        pid_r, h = _program_block_head(n_prog_r, H, HEAD_FASTEST)
        w = tl.load(w_ptr + tl.arange(0, T)).to(tl.float32)
        for it in tl.range(0, TILES, num_stages=STAGES):
            blk = pid_r * TILES + it
            rows, row_ok, offs, q, k, v, a = _row_tile_attention(qkv_ptr, blk, R, stride_row, scale, h, T, H, DH,
                                                                 BLOCK_R)
            c = tl.sum(a * w[None, :, None], axis=1)  # (BLOCK_R, U)
            pooled = tl.sum(c[:, :, None] * v.to(tl.float32), axis=1)  # (BLOCK_R, DH)
            out = rows[:, None].to(tl.int64) * (H * DH) + h * DH + tl.arange(0, DH)[None, :]
            tl.store(out_ptr + out, pooled.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _token_attention_pool_bwd_kernel(
        qkv_ptr, w_ptr, g_ptr, dqkv_ptr, dw_ptr, R, stride_row, scale, n_prog_r,
        T: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, BLOCK_R: tl.constexpr, TILES: tl.constexpr,
        STAGES: tl.constexpr, HEAD_FASTEST: tl.constexpr,
    ):
        # Gradients of pooled = sum_u c_u v_u, c_u = sum_t w_t a_tu, a = softmax_u(s), s_tu = scale q_t . k_u,
        # given g = dL/dpooled (per row and head); the scores are recomputed, nothing but q/k/v is stored between
        # forward and backward:
        #   dv_u = c_u g,  dc_u = v_u . g,  r_t = sum_u a_tu dc_u = dL/dw_t (summed over rows and heads),
        #   ds_tu = a_tu w_t (dc_u - r_t),  dq = scale ds k,  dk = scale ds^T q.
        # Each program writes its partial dL/dw (T,) to dw_ptr[program, head]; the host sums them (no atomics:
        # the result does not depend on the order programs finish).
        pid_r, h = _program_block_head(n_prog_r, H, HEAD_FASTEST)
        w = tl.load(w_ptr + tl.arange(0, T)).to(tl.float32)
        dw_acc = tl.zeros((T,), dtype=tl.float32)
        for it in tl.range(0, TILES, num_stages=STAGES):
            blk = pid_r * TILES + it
            rows, row_ok, offs, q, k, v, a = _row_tile_attention(qkv_ptr, blk, R, stride_row, scale, h, T, H, DH,
                                                                 BLOCK_R)
            g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * (H * DH) + h * DH + tl.arange(0, DH)[None, :],
                        mask=row_ok[:, None], other=0.0).to(tl.float32)  # (BLOCK_R, DH)
            c = tl.sum(a * w[None, :, None], axis=1)  # (BLOCK_R, U)
            dc = tl.sum(v.to(tl.float32) * g[:, None, :], axis=2)  # (BLOCK_R, U)
            r = tl.sum(a * dc[:, None, :], axis=2)  # (BLOCK_R, T)
            ds = a * w[None, :, None] * (dc[:, None, :] - r[:, :, None]) * scale
            dq = tl.dot(ds.to(q.dtype), k, input_precision="ieee", out_dtype=tl.float32)
            dk = tl.dot(tl.trans(ds, (0, 2, 1)).to(q.dtype), q, input_precision="ieee", out_dtype=tl.float32)
            out_ty = dqkv_ptr.dtype.element_ty
            m = row_ok[:, None, None]
            tl.store(dqkv_ptr + offs, dq.to(out_ty), mask=m)
            tl.store(dqkv_ptr + offs + H * DH, dk.to(out_ty), mask=m)
            tl.store(dqkv_ptr + offs + 2 * H * DH, (c[:, :, None] * g[:, None, :]).to(out_ty), mask=m)
            dw_acc += tl.sum(r, axis=0)
        tl.store(dw_ptr + (pid_r * H + h) * T + tl.arange(0, T), dw_acc)

    @triton.jit
    def _projected_attention(x_ptr, wp_ptr, w_ptr, R, scale, h, T: tl.constexpr, DH: tl.constexpr,
                             C: tl.constexpr, CP: tl.constexpr, BLOCK_R: tl.constexpr):
        # Shared by the projecting kernel's forward and backward: rows block program_id(0) of head h, q and k of
        # all T tokens as (BLOCK_R, CP) @ (CP, T * DH) tensor-core products rounded to x's dtype and reshaped to
        # (BLOCK_R, T, DH), and the softmax a (BLOCK_R, T, U) of one batched score product per row. Returns the
        # rows, the row mask, x, the offsets of head h's q weights (v's: + 2 * CP * T * DH; the callers compute v
        # where they need it, the forward after the token mix: 7% faster at 16 channels on an H100), q, k, a
        # and the token-mix weights (T,) in float32. x is (R, C) with rows C apart, read as CP channels (the
        # channels from C on as zeros: see `_x_operand`).
        TD: tl.constexpr = T * DH
        cc = tl.arange(0, CP)
        woffs = (h * 3 * CP + cc[:, None]) * TD + tl.arange(0, TD)[None, :]  # (CP, TD) block of head h's q
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + cc[None, :], mask=row_ok[:, None] & (cc < C)[None, :],
                    other=0.0)
        q = tl.dot(x, tl.load(wp_ptr + woffs), input_precision="ieee", out_dtype=tl.float32).to(x.dtype)
        k = tl.dot(x, tl.load(wp_ptr + woffs + CP * TD), input_precision="ieee", out_dtype=tl.float32).to(x.dtype)
        q3 = tl.reshape(q, (BLOCK_R, T, DH))
        k3 = tl.reshape(k, (BLOCK_R, T, DH))
        s = tl.dot(q3, tl.trans(k3, (0, 2, 1)), input_precision="ieee", out_dtype=tl.float32) * scale
        s = s - tl.max(s, axis=2)[:, :, None]
        e = tl.exp(s)
        a = e / tl.sum(e, axis=2)[:, :, None]
        wt = tl.load(w_ptr + tl.arange(0, T)).to(tl.float32)
        return rows, row_ok, x, woffs, q3, k3, a, wt

    @triton.jit
    def _project_pool_kernel(
        x_ptr, wp_ptr, w_ptr, out_ptr, R, scale,
        T: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # Program (block of BLOCK_R rows, head h). The projection is done here: q/k/v of all T tokens of head h
        # are (BLOCK_R, CP) @ (CP, T * DH) tensor-core products from the normalised input, reshaped to
        # (BLOCK_R, T, DH); the scores of each row are one batched (T, DH) @ (DH, T) product (no masked cross-row
        # entries); q/k/v never reach memory. x is (R, C) with C a multiple of 8 (16-byte aligned rows, masked in
        # whole 8-channel vectors) or zero-padded to C = CP on the host, the weights (H, 3, CP, T * DH), so every
        # load is aligned (masked loads of odd widths such as 53 ran 60x slower on an H200). The output is stored
        # in out's dtype (float32, or the autocast dtype the next matmul would cast it to).
        h = tl.program_id(1)
        rows, row_ok, x, woffs, q3, k3, a, wt = _projected_attention(x_ptr, wp_ptr, w_ptr, R, scale, h, T, DH, C, CP,
                                                                     BLOCK_R)
        c = tl.sum(a * wt[None, :, None], axis=1)  # (BLOCK_R, T): c_u = sum_t w_t a_tu
        v = tl.dot(x, tl.load(wp_ptr + woffs + 2 * CP * T * DH), input_precision="ieee", out_dtype=tl.float32)
        pooled = tl.sum(c[:, :, None] * tl.reshape(v, (BLOCK_R, T, DH)), axis=1)  # (BLOCK_R, DH); v not rounded
        out = rows[:, None].to(tl.int64) * (H * DH) + h * DH + tl.arange(0, DH)[None, :]
        tl.store(out_ptr + out, pooled.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _project_pool_bwd_kernel(
        x_ptr, wp_ptr, w_ptr, g_ptr, dqkv_ptr, dw_ptr, R, scale,
        T: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # Gradients of `_project_pool_kernel`'s output w.r.t. q/k/v (written to dqkv, (R, T * 3 * H * DH) in the
        # to_qkv output layout) and the token-mix weights (per-program partial sums, summed on the host), given
        # g = dL/dpooled. Program (block of BLOCK_R rows, head h); q, k, v are recomputed from x exactly as in the
        # forward (q and k rounded to x's dtype, v float32), then as in `_token_attention_pool_bwd_kernel`:
        #   dv_u = c_u g,  dc_u = v_u . g,  r_t = sum_u a_tu dc_u,  ds_tu = a_tu w_t (dc_u - r_t),
        #   dq = scale ds k,  dk = scale ds^T q.
        # dx and dW of the projection are then two cuBLAS matmuls of dqkv on the host.
        pid = tl.program_id(0)
        h = tl.program_id(1)
        rows, row_ok, x, woffs, q3, k3, a, wt = _projected_attention(x_ptr, wp_ptr, w_ptr, R, scale, h, T, DH, C, CP,
                                                                     BLOCK_R)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * (H * DH) + h * DH + tl.arange(0, DH)[None, :],
                    mask=row_ok[:, None], other=0.0).to(tl.float32)  # (BLOCK_R, DH); 0 on rows past R
        v = tl.dot(x, tl.load(wp_ptr + woffs + 2 * CP * T * DH), input_precision="ieee", out_dtype=tl.float32)
        dc = tl.sum(tl.reshape(v, (BLOCK_R, T, DH)) * g[:, None, :], axis=2)  # (BLOCK_R, U)
        c = tl.sum(a * wt[None, :, None], axis=1)  # (BLOCK_R, U)
        # dqkv offsets of (row, token, channel) for q; k and v follow at + H * DH and + 2 * H * DH
        offs = (rows[:, None, None].to(tl.int64) * (T * 3 * H * DH) + tl.arange(0, T)[None, :, None] * (3 * H * DH)
                + h * DH + tl.arange(0, DH)[None, None, :])
        out_ty = dqkv_ptr.dtype.element_ty
        tl.store(dqkv_ptr + offs + 2 * H * DH, (c[:, :, None] * g[:, None, :]).to(out_ty), mask=row_ok[:, None, None])
        r = tl.sum(a * dc[:, None, :], axis=2)  # (BLOCK_R, T)
        ds = (a * wt[None, :, None] * (dc[:, None, :] - r[:, :, None]) * scale).to(q3.dtype)  # (BLOCK_R, T, U)
        dq = tl.dot(ds, k3, input_precision="ieee", out_dtype=tl.float32)
        tl.store(dqkv_ptr + offs, dq.to(out_ty), mask=row_ok[:, None, None])
        dk = tl.dot(tl.trans(ds, (0, 2, 1)), q3, input_precision="ieee", out_dtype=tl.float32)
        tl.store(dqkv_ptr + offs + H * DH, dk.to(out_ty), mask=row_ok[:, None, None])
        tl.store(dw_ptr + (pid * H + h) * T + tl.arange(0, T), tl.sum(r, axis=0))


def _staging_bases(block_rows: int) -> list[list[int]]:
    """Shared-memory layout of the Gluon kernel's (rows, 16 tokens, 32 channels) 2-byte q and k tiles, as the
    (row, token, channel) coordinate of the element at each power-of-two offset (Gluon's `SharedLinearLayout`).

    Element offset bits a0-a13 (block_rows = 32) from the coordinates' bits r, t, d:
        a0-a2 = d0-d2 (8 channels = one 16-byte chunk),  a3 = d3 ^ t1 ^ r0,  a4 = d4 ^ t2 ^ r1,  a5 = t0 ^ r2,
        a6-a8 = t1-t3,  a9... = r0...
    a3-a5 number the eight 16-byte chunks of a 128-byte line, i.e. the bank group. The score product reads 8
    tokens of one row per ldmatrix (t0-t2 vary: a3-a5 take 8 different values); the projection writes 8 rows
    of one token per stmatrix (r0-r2 vary: again 8 different values). So neither access has bank conflicts,
    where Triton's own choice for the `tl.dot` form (rows fastest after the channels) made every ldmatrix an
    8-way conflict (ncu on an H100, BENCHMARKS.md). The inverse map below lists, per offset bit, the
    coordinate whose address is that bit alone (e.g. offset 2^9 is row 1 with d3 set, cancelling a3's r0)."""
    if block_rows < 8 or block_rows & (block_rows - 1):
        raise ValueError(f"staging layout: block_rows must be a power of two >= 8, got {block_rows}")
    bases = [[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8], [0, 0, 16],  # a0-a4
             [0, 1, 0],  # a5 (t0)
             [0, 2, 8], [0, 4, 16], [0, 8, 0],  # a6 = t1 (with d3, cancelling it in a3), a7 = t2 (with d4), a8 = t3
             [1, 0, 8], [2, 0, 16], [4, 1, 0]]  # a9 = r0 (with d3), a10 = r1 (with d4), a11 = r2 (with t0)
    r = 8
    while r < block_rows:
        bases.append([r, 0, 0])
        r *= 2
    return bases


if gluon is not None:

    @gluon.jit
    def _gluon_permuted(t, P: gl.constexpr):
        # gl.permute(t, P) for the 12 to 15 dimensions of `_fragment_perm`'s blocks (16 to 64 rows, 256 or 512
        # columns), with the dimensions written out: Triton 3.6's permute takes no constexpr tuple (later versions
        # do).
        if len(t.shape) == 12:
            r = gl.permute(t, (P[0], P[1], P[2], P[3], P[4], P[5], P[6], P[7], P[8], P[9], P[10], P[11]))
        elif len(t.shape) == 13:
            r = gl.permute(t, (P[0], P[1], P[2], P[3], P[4], P[5], P[6], P[7], P[8], P[9], P[10], P[11], P[12]))
        elif len(t.shape) == 14:
            r = gl.permute(t, (P[0], P[1], P[2], P[3], P[4], P[5], P[6], P[7], P[8], P[9], P[10], P[11], P[12],
                               P[13]))
        else:
            r = gl.permute(t, (P[0], P[1], P[2], P[3], P[4], P[5], P[6], P[7], P[8], P[9], P[10], P[11], P[12],
                               P[13], P[14]))
        return r

    @gluon.jit
    def _gluon_weight(wp_ptr, woffs, h, j: gl.constexpr, ci: gl.constexpr, P: gl.constexpr, CP: gl.constexpr,
                      CN: gl.constexpr, TD: gl.constexpr, NW: gl.constexpr, PERM: gl.constexpr,
                      BITS: gl.constexpr):
        # The (CP, CN) weight block of head h, q/k/v j, column chunk ci as the mma's B operand. PERM (a tuple)
        # set: wp holds `_weight_fragments`, each block stored in the order of the operand's registers, lanes and
        # warps; a flat, vectorised (16-byte) load is then permuted into place bit by bit (reshape to the shape
        # BITS, dimensions of 2, permute, reshape), and the layout conversion moves nothing between threads (no
        # shared memory). PERM empty: wp is (H, 3, CP, TD) and the block, loaded at woffs, goes to the operand
        # layout through shared memory.
        if PERM != ():
            TOTAL: gl.constexpr = CP * CN
            L1: gl.constexpr = gl.BlockedLayout([8], [32], [NW], [0])  # 16-byte runs, a warp's 512 B contiguous
            base = ((h * 3 + j) * (TD // CN) + ci) * TOTAL
            flat = gl.load(wp_ptr + base + gl.arange(0, TOTAL, layout=L1))
            w = gl.reshape(_gluon_permuted(gl.reshape(flat, BITS), PERM), [CP, CN])
        else:
            w = gl.load(wp_ptr + woffs + j * CP * TD + ci * CN)
        return gl.convert_layout(w, gl.DotOperandLayout(1, P, 2))

    @gluon.jit
    def _gluon_value_chunk(xd, wv, c_s, zero, ci: gl.constexpr, BLOCK_R: gl.constexpr, TC: gl.constexpr,
                           DH: gl.constexpr):
        # sum_u c_u v_u over the TC tokens of column chunk ci: v (float32, as in `_project_pool_kernel`) from one
        # mma with the B operand wv, c from shared memory in the layout of v's token axis. Returns (BLOCK_R, DH).
        v3 = gl.reshape(_mma_v2(xd, wv, zero), (BLOCK_R, TC, DH))
        c = c_s.slice(ci * TC, TC, dim=1).load(gl.SliceLayout(2, v3.type.layout))
        return gl.sum(c[:, :, None] * v3, axis=1)

    @gluon.jit
    def _project_pool_gluon_kernel(
        x_ptr, wp_ptr, w_ptr, out_ptr, R, scale,
        T: gl.constexpr, H: gl.constexpr, DH: gl.constexpr, C: gl.constexpr, CP: gl.constexpr, BLOCK_R: gl.constexpr,
        STAGING: gl.constexpr, NW: gl.constexpr, CHUNKS: gl.constexpr, PERM: gl.constexpr = (),
        BITS: gl.constexpr = (),
    ):
        # `_project_pool_kernel`'s function (same operands, same rounding: q and k rounded to x's dtype, v and the
        # softmax float32) with explicit layouts. Program (block of BLOCK_R rows, head h), NW warps:
        #   q, k, v = x @ W_h (BLOCK_R, CP) @ (CP, T * DH) with mma.sync, warps side by side along the columns,
        #   in CHUNKS column chunks of T / CHUNKS tokens (fewer registers for the weight operand and accumulator);
        #   q and k -> x's dtype, reshaped (BLOCK_R, T, DH) and stored to shared memory in the STAGING layout
        #   (`_staging_bases`: no bank conflicts on the stores or on the score product's loads);
        #   scores: one batched (T, DH) @ (DH, T) mma per row, the rows spread over the warps;
        #   c_u = sum_t w_t softmax_u(scores)_tu, pooled = sum_u c_u v_u (v chunk by chunk, c from shared memory),
        #   stored in out's dtype.
        # x as in `_project_pool_kernel`: rows C apart, the channels from C to CP read as zeros. The weights:
        # `_gluon_weight` (PERM given: wp from `_weight_fragments`, loaded straight into the operand layout).
        TC: gl.constexpr = T // CHUNKS
        CN: gl.constexpr = TC * DH
        TD: gl.constexpr = T * DH
        dt: gl.constexpr = x_ptr.dtype.element_ty
        XB: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (CP // 8), CP // 8], [NW, 1], [1, 0])
        WB: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NW, 1], [1, 0])
        P: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
        S3: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1],
                                                     instr_shape=[1, 16, 8])
        blk = gl.program_id(0)
        h = gl.program_id(1)
        rows_x = blk * BLOCK_R + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, XB))
        cx = gl.arange(0, CP, layout=gl.SliceLayout(0, XB))
        x_ok = (rows_x < R)[:, None] & (cx < C)[None, :]
        x = gl.load(x_ptr + rows_x[:, None].to(gl.int64) * C + cx[None, :], mask=x_ok, other=0.0)
        xd = gl.convert_layout(x, gl.DotOperandLayout(0, P, 2))
        cw = gl.arange(0, CP, layout=gl.SliceLayout(1, WB))
        woffs = (h * 3 * CP + cw[:, None]) * TD + gl.arange(0, CN, layout=gl.SliceLayout(0, WB))[None, :]
        zero = gl.zeros((BLOCK_R, CN), gl.float32, P)
        q_s = gl.allocate_shared_memory(dt, [BLOCK_R, T, DH], STAGING)
        k_s = gl.allocate_shared_memory(dt, [BLOCK_R, T, DH], STAGING)
        for ci in gl.static_range(CHUNKS):
            wq = _gluon_weight(wp_ptr, woffs, h, 0, ci, P, CP, CN, TD, NW, PERM, BITS)
            q_s.slice(ci * TC, TC, dim=1).store(gl.reshape(_mma_v2(xd, wq, zero).to(dt), (BLOCK_R, TC, DH)))
            wk = _gluon_weight(wp_ptr, woffs, h, 1, ci, P, CP, CN, TD, NW, PERM, BITS)
            k_s.slice(ci * TC, TC, dim=1).store(gl.reshape(_mma_v2(xd, wk, zero).to(dt), (BLOCK_R, TC, DH)))
        _cta_barrier()
        s = _mma_v2(q_s.load(gl.DotOperandLayout(0, S3, 2)), k_s.permute((0, 2, 1)).load(gl.DotOperandLayout(1, S3, 2)),
                    gl.zeros((BLOCK_R, T, T), gl.float32, S3)) * scale
        s = s - gl.max(s, axis=2)[:, :, None]
        e = gl.exp(s)
        a = e / gl.sum(e, axis=2)[:, :, None]
        wt = gl.load(w_ptr + gl.arange(0, T, layout=gl.SliceLayout(0, gl.SliceLayout(2, S3)))).to(gl.float32)
        c = gl.sum(a * wt[None, :, None], axis=1)  # (BLOCK_R, U)
        c_s = gl.allocate_shared_memory(gl.float32, [BLOCK_R, T], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]), c)
        _cta_barrier()
        pooled = _gluon_value_chunk(xd, _gluon_weight(wp_ptr, woffs, h, 2, 0, P, CP, CN, TD, NW, PERM, BITS), c_s,
                                    zero, 0, BLOCK_R, TC, DH)
        for ci in gl.static_range(1, CHUNKS):
            wv = _gluon_weight(wp_ptr, woffs, h, 2, ci, P, CP, CN, TD, NW, PERM, BITS)
            pooled += _gluon_value_chunk(xd, wv, c_s, zero, ci, BLOCK_R, TC, DH)
        PL: gl.constexpr = pooled.type.layout
        rows_o = blk * BLOCK_R + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, PL))
        out = rows_o[:, None].to(gl.int64) * (H * DH) + h * DH + gl.arange(0, DH, layout=gl.SliceLayout(0, PL))[None, :]
        gl.store(out_ptr + out, pooled.to(out_ptr.dtype.element_ty), mask=(rows_o < R)[:, None])


@torch.library.custom_op("ofer::token_attention_pool", mutates_args=())
def token_attention_pool(qkv: torch.Tensor, w: torch.Tensor, tokens: int, heads: int, head_dim: int,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Token-mixed attention output of every row and head.

    Args:
        qkv: (R, tokens * 3 * heads * head_dim), rows contiguous, laid out (token, q/k/v, head, channel).
        w: (tokens,) token-mix weights.
        tokens, heads, head_dim: the attention shape; tokens and head_dim powers of two, tokens >= 16.
        out_dtype: the output's dtype (None: float32). Computed in float32 and rounded to nearest once on the
            store, as `.to(torch.bfloat16)` of the float32 output would (up to float32 summation order, which
            the compiler may choose differently for the two outputs): under autocast the next matmul casts it
            anyway, and the separate cast kernel (reading 4 and writing 2 bytes per value) is gone.

    Returns:
        (R, heads * head_dim) in out_dtype: sum_t w_t attention(q, k, v)_t per head, channels head-major.
    """
    if not available(qkv, head_dim):
        raise RuntimeError("token_attention_pool needs Triton (shipped with CUDA builds of torch), a CUDA tensor "
                           f"(or TRITON_INTERPRET=1) and head_dim >= 16; got a {qkv.device.type} tensor, head_dim "
                           f"{head_dim}, Triton {'installed' if triton is not None else 'not installed'}")
    R = qkv.shape[0]
    if qkv.ndim != 2 or qkv.shape[1] != tokens * 3 * heads * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"token_attention_pool: qkv must be a row-contiguous (R, {tokens * 3 * heads * head_dim}) "
                         f"tensor, got shape {tuple(qkv.shape)} strides {qkv.stride()}")
    if tokens & (tokens - 1) or head_dim & (head_dim - 1) or tokens < 16:
        raise ValueError(f"token_attention_pool: tokens ({tokens}) and head_dim ({head_dim}) must be powers of two, "
                         "tokens >= 16")
    out_dtype = _out_dtype(out_dtype, "token_attention_pool")
    if qkv.is_cuda and torch.cuda.get_device_capability(qkv.device) < (8, 0):
        return _pooled_torch(qkv, w, tokens, heads, head_dim).to(out_dtype)
    out = torch.empty(R, heads * head_dim, device=qkv.device, dtype=out_dtype)
    if R == 0:
        return out
    n_prog_r, meta = _launch_meta(current_launch(qkv.device), R)
    _token_attention_pool_kernel[(n_prog_r * heads,)](qkv, w.contiguous(), out, R, qkv.stride(0), head_dim**-0.5,
                                                      n_prog_r, T=tokens, H=heads, DH=head_dim, **meta)
    return out


def _launch_meta(launch: dict, R: int) -> tuple[int, dict]:
    """Row-block programs per head for R rows, and the kernel's launch keywords, from a launch (`current_launch`)."""
    n_prog_r = triton.cdiv(triton.cdiv(R, launch["block_rows"]), launch["tiles"])
    return n_prog_r, {"BLOCK_R": launch["block_rows"], "TILES": launch["tiles"], "STAGES": launch["stages"],
                      "HEAD_FASTEST": launch["order"] == "head", "num_warps": launch["num_warps"]}


def _out_dtype(out_dtype: torch.dtype | None, op: str) -> torch.dtype:
    """The ops' output dtype: float32 by default, else float32, bfloat16 or float16 (a clear error otherwise)."""
    if out_dtype is None:
        return torch.float32
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: out_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                         f"got {out_dtype}")
    return out_dtype


@token_attention_pool.register_fake
def _(qkv: torch.Tensor, w: torch.Tensor, tokens: int, heads: int, head_dim: int,
      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return qkv.new_empty(qkv.shape[0], heads * head_dim, dtype=_out_dtype(out_dtype, "token_attention_pool"))


@torch.library.custom_op("ofer::token_attention_pool_backward", mutates_args=())
def token_attention_pool_backward(qkv: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, tokens: int, heads: int,
                                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `token_attention_pool` w.r.t. qkv (qkv's dtype and shape) and w (w's dtype), given
    grad = dL/d(output), (R, heads * head_dim). One Triton kernel launched as `BACKWARD_LAUNCH`; the scores are
    recomputed from qkv."""
    R = qkv.shape[0]
    grad = grad.contiguous()  # the kernel reads it in its dtype and computes in float32 (no float32 copy)
    if qkv.is_cuda and torch.cuda.get_device_capability(qkv.device) < (8, 0):
        return _grads_torch(qkv, w, grad.float(), tokens, heads, head_dim)
    qkv = qkv.contiguous()  # a row-strided view: dqkv below is written with qkv's row stride
    dqkv = qkv.new_empty(qkv.shape)
    n_prog_r, meta = _launch_meta(current_launch(qkv.device, backward=True), R)
    dw_part = torch.empty(n_prog_r, heads, tokens, device=qkv.device, dtype=torch.float32)
    if R > 0:
        _token_attention_pool_bwd_kernel[(n_prog_r * heads,)](qkv, w.contiguous(), grad, dqkv, dw_part, R,
                                                              qkv.stride(0), head_dim**-0.5, n_prog_r, T=tokens,
                                                              H=heads, DH=head_dim, **meta)
    return dqkv, dw_part.sum((0, 1)).to(w.dtype)


@token_attention_pool_backward.register_fake
def _(qkv: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, tokens: int, heads: int,
      head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return qkv.new_empty(qkv.shape), w.new_empty(w.shape)


def _pool_setup_context(ctx, inputs, output) -> None:
    qkv, w, tokens, heads, head_dim, _ = inputs
    ctx.save_for_backward(qkv, w)
    ctx.shape = (tokens, heads, head_dim)


def _pool_backward(ctx, grad: torch.Tensor):
    qkv, w = ctx.saved_tensors
    dqkv, dw = token_attention_pool_backward(qkv, w, grad, *ctx.shape)
    return dqkv, dw, None, None, None, None


token_attention_pool.register_autograd(_pool_backward, setup_context=_pool_setup_context)


@torch.library.custom_op("ofer::token_attention_project_pool", mutates_args=())
def token_attention_project_pool(x: torch.Tensor, wqkv: torch.Tensor, w: torch.Tensor, tokens: int, heads: int,
                                 head_dim: int, out_dtype: torch.dtype | None = None,
                                 prepared: torch.Tensor | None = None,
                                 prepared_layout: list[int] | None = None) -> torch.Tensor:
    """`token_attention_pool(x @ wqkv.T, w, ...)` with the q/k/v projection inside the kernel (narrow inputs).

    Args:
        x: (R, C) normalised attention input, rows contiguous; C <= 64.
        wqkv: (tokens * 3 * heads * head_dim, C) the to_qkv weight (rows laid out token, q/k/v, head, channel),
            same dtype as x (the kernel multiplies in that dtype and accumulates in float32; q and k are rounded
            to it before the score product, v is kept in float32).
        w: (tokens,) token-mix weights.
        tokens, heads, head_dim: the attention shape; tokens and head_dim powers of two, tokens >= 16.
        out_dtype: the output's dtype (None: float32), as in `token_attention_pool`.
        prepared, prepared_layout: wqkv already in the layout the kernel reads, and that layout
            (`prepare_project_weight(wqkv, ..., project_layout(...))`): used when the layout is the one this call
            needs (`project_layout` of x now), else wqkv is laid out here, as without them. Inference copies
            prepare it once (`TokenSelfAttention.prepare_projection`) instead of in every call: one to three small
            copies per call (2.6% of a compiled ExpGen sampling step on an H100, BENCHMARKS.md).

    Returns:
        (R, heads * head_dim) in out_dtype, as `token_attention_pool`.
    """
    if not available(x, head_dim):
        raise RuntimeError("token_attention_project_pool needs Triton (shipped with CUDA builds of torch), a CUDA "
                           f"tensor (or TRITON_INTERPRET=1) and head_dim >= 16; got a {x.device.type} tensor, "
                           f"head_dim {head_dim}, Triton {'installed' if triton is not None else 'not installed'}")
    R, C = x.shape if x.ndim == 2 else (-1, -1)
    if x.ndim != 2 or x.stride(1) != 1 or not 1 <= C <= max(PROJECT_LAUNCH):
        raise ValueError(f"token_attention_project_pool: x must be a row-contiguous (R, C) tensor with 1 <= C <= "
                         f"{max(PROJECT_LAUNCH)}, got shape {tuple(x.shape)} strides {x.stride()}")
    if wqkv.shape != (tokens * 3 * heads * head_dim, C) or not wqkv.is_contiguous() or wqkv.dtype != x.dtype:
        raise ValueError(f"token_attention_project_pool: wqkv must be a contiguous ({tokens * 3 * heads * head_dim}, "
                         f"{C}) tensor of x's dtype {x.dtype}, got {tuple(wqkv.shape)} {wqkv.dtype}")
    if tokens & (tokens - 1) or head_dim & (head_dim - 1) or tokens < 16:
        raise ValueError(f"token_attention_project_pool: tokens ({tokens}) and head_dim ({head_dim}) must be powers "
                         "of two, tokens >= 16")
    out_dtype = _out_dtype(out_dtype, "token_attention_project_pool")
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
        return _pooled_torch(x @ wqkv.T, w, tokens, heads, head_dim).to(out_dtype)
    out = torch.empty(R, heads * head_dim, device=x.device, dtype=out_dtype)
    if R == 0:
        return out
    xp, c, cp = _x_operand(x)
    layout = project_layout(C, tokens, heads, head_dim, x.dtype, x.device)
    if prepared is not None and list(prepared_layout or ()) == layout and prepared.device == x.device:
        if prepared.dtype != x.dtype or prepared.shape != _prepared_shape(tokens, heads, head_dim, layout):
            raise ValueError(f"token_attention_project_pool: prepared weight of layout {layout} must be a "
                             f"{x.dtype} tensor of shape {_prepared_shape(tokens, heads, head_dim, layout)}, got "
                             f"{prepared.dtype} {tuple(prepared.shape)}")
        wp = prepared
    else:
        wp = prepare_project_weight(wqkv, tokens, heads, head_dim, layout)
    if _gluon_projects(x, tokens, head_dim):
        consts, options = _gluon_launch_args(c, cp, tokens, heads, head_dim)
        grid = (triton.cdiv(R, consts["BLOCK_R"]), heads)
        _project_pool_gluon_kernel[grid](xp, wp, w.contiguous(), out, R, head_dim**-0.5, **consts, **options)
        return out
    launch = PROJECT_LAUNCH[cp]
    grid = (triton.cdiv(R, launch["block_rows"]), heads)
    _project_pool_kernel[grid](xp, wp, w.contiguous(), out, R, head_dim**-0.5, T=tokens, H=heads, DH=head_dim,
                               C=c, CP=cp, BLOCK_R=launch["block_rows"], num_warps=launch["num_warps"])
    return out


def _gluon_projects(x: torch.Tensor, tokens: int, head_dim: int) -> bool:
    """Whether `token_attention_project_pool` runs the Gluon kernel on x: PROJECT_KERNEL "gluon", Gluon importable,
    a CUDA tensor (not the interpreter) in bf16 or fp16, 16 tokens of 32 channels (the shape `_staging_bases`
    is written for)."""
    return _gluon_projects_on(x.dtype, x.device, tokens, head_dim)


def _gluon_projects_on(dtype: torch.dtype, device: torch.device, tokens: int, head_dim: int) -> bool:
    return (PROJECT_KERNEL == "gluon" and gluon is not None and device.type == "cuda" and not _INTERPRET
            and dtype in (torch.bfloat16, torch.float16) and tokens == 16 and head_dim == 32)


def project_layout(width: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device) -> list[int]:
    """How `token_attention_project_pool`'s kernel reads the to_qkv weight for inputs of `width` channels in
    `dtype` on `device`, under the module's current settings (PROJECT_KERNEL, PROJECT_GLUON_LAUNCH,
    PROJECT_WEIGHT_FRAGMENTS): [1, cp, chunks, *perm] for the Gluon kernel's weight fragments (`_weight_fragments`),
    [0, cp] for row-major blocks (`_weight_blocks`), cp the padded width. Pure Python on static properties."""
    cp = _padded_width(width)
    if _gluon_projects_on(dtype, device, tokens, head_dim):
        consts, _ = _gluon_launch_args(cp, cp, tokens, heads, head_dim)  # the fragments do not depend on c
        if consts["PERM"]:
            return [1, cp, consts["CHUNKS"], *consts["PERM"]]
    return [0, cp]


def _padded_width(n: int) -> int:
    """n rounded up to a power of two, at least 16 (a tensor-core operand's side)."""
    return max(16, 1 << (n - 1).bit_length())


def prepare_project_weight(wqkv: torch.Tensor, tokens: int, heads: int, head_dim: int,
                           layout: list[int]) -> torch.Tensor:
    """The to_qkv weight (T * 3 * H * Dh, C) in a `project_layout` (a new tensor, wqkv's dtype and device)."""
    if layout[0] == 1:
        return _weight_fragments(wqkv, tokens, heads, head_dim, layout[1], layout[2], tuple(layout[3:]))
    return _weight_blocks(wqkv, tokens, heads, head_dim, layout[1])


def _prepared_shape(tokens: int, heads: int, head_dim: int, layout: list[int]) -> tuple[int, ...]:
    if layout[0] == 1:
        return (heads, 3, layout[2], layout[1] * tokens * head_dim // layout[2])
    return (heads, 3, layout[1], tokens, head_dim)


def _gluon_launch_args(c: int, cp: int, tokens: int, heads: int, head_dim: int) -> tuple[dict, dict]:
    """The Gluon kernel's compile-time arguments (constexprs) and launch options for inputs of c channels read as
    cp (`_x_operand`), from `PROJECT_GLUON_LAUNCH` (also used by the test that compiles it ahead of time)."""
    launch = PROJECT_GLUON_LAUNCH[cp]
    cn = tokens * head_dim // launch["chunks"]
    perm = _fragment_perm(cp, cn, launch["num_warps"]) if PROJECT_WEIGHT_FRAGMENTS else ()
    consts = {"T": tokens, "H": heads, "DH": head_dim, "C": c, "CP": cp, "BLOCK_R": launch["block_rows"],
              "STAGING": _staging_layout(launch["block_rows"]), "NW": launch["num_warps"], "CHUNKS": launch["chunks"],
              "PERM": perm, "BITS": (2,) * len(perm)}
    options = {"num_warps": launch["num_warps"], **({"maxnreg": launch["maxnreg"]} if launch["maxnreg"] else {})}
    return consts, options


@functools.lru_cache(maxsize=None)
def _fragment_perm(cp: int, cn: int, num_warps: int) -> tuple[int, ...]:
    """How `_gluon_weight` permutes a flat weight fragment into its (cp, cn) block: the permutation of the NBITS
    dimensions of 2 (dimension 0 the most significant bit of the flat offset), listed in the order of the block's
    row bits then column bits, most significant first.

    The flat offset's bits, least significant first, are those of the mma.sync B operand (bf16/fp16, k_width 2,
    warps side by side along the columns) as Triton lays it out: its first three register bits (k0, k3, then k4
    or n5), lanes k1, k2, n0, n1, n2, warps n3, n4, ..., then its other register bits (the remaining k bits, then
    the column bits above the warps') (k: row of the (cp, cn) block, n: column;
    `triton.experimental.gluon.language.to_linear_layout` of `DotOperandLayout(1, P, 2)` printed these for 16 x
    512 and 64 x 256 blocks with 4 warps). Each thread's registers are then 16-byte runs, each warp load 512
    contiguous bytes, and the conversion to the operand layout needs no shared memory. The function does not
    depend on this order being Triton's (`_weight_fragments` and `_gluon_weight` invert each other for any
    permutation); only the speed does."""
    kb, nb, wb = cp.bit_length() - 1, cn.bit_length() - 1, num_warps.bit_length() - 1
    if 1 << kb != cp or 1 << nb != cn or 1 << wb != num_warps or kb < 4 or nb < 3 + wb or not 12 <= kb + nb <= 15:
        raise ValueError(f"weight fragments: a {cp} x {cn} block over {num_warps} warps is not a B operand of "
                         "power-of-two sides >= 16 rows and 8 columns per lane group and warp, of 2^12 to 2^15 "
                         "values")
    reg = [("k", 0), ("k", 3)] + [("k", b) for b in range(4, kb)] + [("n", b) for b in range(3 + wb, nb)]
    # a flat load of 8 values per thread and instruction: offset bits = 3 register bits (one 16-byte run), the 5
    # lane bits, the warp bits, then the other register bits (so each warp reads 512 contiguous bytes at a time)
    addr = reg[:3] + [("k", 1), ("k", 2), ("n", 0), ("n", 1), ("n", 2)] + [("n", 3 + i) for i in range(wb)] + reg[3:]
    target = [("k", b) for b in reversed(range(kb))] + [("n", b) for b in reversed(range(nb))]
    return tuple(kb + nb - 1 - addr.index(t) for t in target)


def _weight_fragments(wqkv: torch.Tensor, tokens: int, heads: int, head_dim: int, cp: int, chunks: int,
                      perm: tuple[int, ...]) -> torch.Tensor:
    """The to_qkv weight (T * 3 * H * Dh, C), laid out (token, q/k/v, head, channel) x input channel, as the Gluon
    kernel's (H, 3, chunks, cp * cn) flat fragments: each (cp, cn) block of `_weight_blocks`' (cp, T * Dh) rows
    (column chunk ci, cn = T * Dh / chunks; zero rows from C to cp) stored so that `_gluon_weight`'s reshape /
    permute / reshape of it gives the block back. One permuted copy (after a zero pad of the input channels when
    C < cp): every index is split into its bits, so the whole relayout is a single permute of a view."""
    C = wqkv.shape[1]
    if C < cp:
        wqkv = torch.nn.functional.pad(wqkv, (0, cp - C))
    tb, db, kb = (v.bit_length() - 1 for v in (tokens, head_dim, cp))
    cb = chunks.bit_length() - 1
    # the view's dimensions: token bits (most significant first), q/k/v, head, head_dim bits, channel bits
    v = wqkv.view(*[2] * tb, 3, heads, *[2] * db, *[2] * kb)
    k_dims = [tb + 2 + db + i for i in range(kb)]
    n_dims = list(range(tb)) + [tb + 2 + i for i in range(db)]  # the column t * Dh + d, most significant first
    block = k_dims + n_dims[cb:]  # a (cp, cn) block's row bits then column bits
    inv = sorted(range(len(perm)), key=perm.__getitem__)  # bits[perm[i]] is the block's i-th bit: invert
    order = [tb + 1, tb] + n_dims[:cb] + [block[i] for i in inv]
    return v.permute(order).reshape(heads, 3, chunks, cp << (tb + db - cb))


@functools.lru_cache(maxsize=None)
def _staging_layout(block_rows: int):  # noqa: ANN202 -- a Gluon layout (Gluon is optional)
    """`_staging_bases` as Gluon's SharedLinearLayout, built once per row count (not on every call)."""
    return gl.SharedLinearLayout(_staging_bases(block_rows))


def _x_operand(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The projecting kernels' input: x as (R, c) rows, c and the padded width cp (16, 32 or 64) that the kernels
    compute with, reading channels c..cp-1 as zeros. x is passed as it is (c = its width) when its width is a
    multiple of 8, so its rows are 16-byte aligned and the masked channels come in whole 8-channel vectors (every
    width of a `Denoiser.padded` copy), else zero-padded here to c = cp (R * 64 values at most)."""
    C = x.shape[1]
    cp = _padded_width(C)
    xp, c = (x.contiguous(), C) if C % 8 == 0 else (torch.nn.functional.pad(x, (0, cp - C)), cp)
    return xp, c, cp


def _weight_blocks(wqkv: torch.Tensor, tokens: int, heads: int, head_dim: int, cp: int) -> torch.Tensor:
    """The to_qkv weight laid out (head, q/k/v, channel, token, head_dim), zero-padded to cp channels: a
    (cp, T * Dh) row-major block per head and q/k/v, the tensor-core operand as the Triton kernels (and the Gluon
    kernel without fragments) load it. At most 786 KB, against the R * 6,144-wide q/k/v tensor it replaces."""
    wp = wqkv.new_zeros(heads, 3, cp, tokens, head_dim)
    wp[:, :, :wqkv.shape[1]] = wqkv.view(tokens, 3, heads, head_dim, -1).permute(2, 1, 4, 0, 3)
    return wp


@token_attention_project_pool.register_fake
def _(x: torch.Tensor, wqkv: torch.Tensor, w: torch.Tensor, tokens: int, heads: int, head_dim: int,
      out_dtype: torch.dtype | None = None, prepared: torch.Tensor | None = None,
      prepared_layout: list[int] | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[0], heads * head_dim, dtype=_out_dtype(out_dtype, "token_attention_project_pool"))


@torch.library.custom_op("ofer::token_attention_project_pool_backward", mutates_args=())
def token_attention_project_pool_backward(x: torch.Tensor, wqkv: torch.Tensor, w: torch.Tensor, grad: torch.Tensor,
                                          tokens: int, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `token_attention_project_pool` w.r.t. the projection output q/k/v, (R, tokens * 3 * heads *
    head_dim) in x's dtype, laid out as `x @ wqkv.T` (so dx = dqkv @ wqkv and dwqkv = dqkv.T @ x), and w.r.t. w
    (w's dtype), given grad = dL/d(output). One Triton kernel per (rows, head) launched as `PROJECT_BACKWARD_LAUNCH`
    recomputes q/k/v from x: nothing of the 6,144-wide q/k/v is kept between forward and backward."""
    R = x.shape[0]
    grad = grad.contiguous()  # read in its dtype by the kernel, as in `token_attention_pool_backward`
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
        return _grads_torch(x @ wqkv.T, w, grad.float(), tokens, heads, head_dim)
    xp, c, cp = _x_operand(x)
    wp = _weight_blocks(wqkv, tokens, heads, head_dim, cp)
    launch = PROJECT_BACKWARD_LAUNCH[cp]
    grid = (triton.cdiv(R, launch["block_rows"]), heads)
    dqkv = x.new_empty(R, tokens * 3 * heads * head_dim)
    dw_part = torch.empty(grid[0], heads, tokens, device=x.device, dtype=torch.float32)
    if R > 0:
        _project_pool_bwd_kernel[grid](xp, wp, w.contiguous(), grad, dqkv, dw_part, R, head_dim**-0.5, T=tokens,
                                       H=heads, DH=head_dim, C=c, CP=cp, BLOCK_R=launch["block_rows"],
                                       num_warps=launch["num_warps"])
    return dqkv, dw_part.sum((0, 1)).to(w.dtype)


@token_attention_project_pool_backward.register_fake
def _(x: torch.Tensor, wqkv: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, tokens: int, heads: int,
      head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[0], tokens * 3 * heads * head_dim), w.new_empty(w.shape)


def _project_setup_context(ctx, inputs, output) -> None:
    x, wqkv, w, tokens, heads, head_dim = inputs[:6]
    ctx.save_for_backward(x, wqkv, w)
    ctx.shape = (tokens, heads, head_dim)


def _project_backward(ctx, grad: torch.Tensor):
    x, wqkv, w = ctx.saved_tensors
    dqkv, dw = token_attention_project_pool_backward(x, wqkv, w, grad, *ctx.shape)
    dx = dqkv @ wqkv if ctx.needs_input_grad[0] else None
    dwqkv = dqkv.T @ x if ctx.needs_input_grad[1] else None
    return dx, dwqkv, dw, None, None, None, None, None, None


token_attention_project_pool.register_autograd(_project_backward, setup_context=_project_setup_context)


def _grads_torch(qkv: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, tokens: int, heads: int,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward ops' function by autograd through `_pooled_torch` (GPUs without bf16 tensor cores): the
    gradients w.r.t. qkv and w, in their dtypes."""
    with torch.enable_grad():
        qkv_, w_ = qkv.detach().requires_grad_(), w.detach().requires_grad_()
        dqkv, dw = torch.autograd.grad(_pooled_torch(qkv_, w_, tokens, heads, head_dim), (qkv_, w_), grad)
    return dqkv.to(qkv.dtype), dw.to(w.dtype)


def _pooled_torch(qkv: torch.Tensor, w: torch.Tensor, tokens: int, heads: int, head_dim: int) -> torch.Tensor:
    """The op's function with PyTorch matmuls in float32 (GPUs without bf16 tensor cores)."""
    x = qkv.float().view(-1, tokens, 3, heads, head_dim)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (R, H, T, Dh)
    att = (q @ k.transpose(-1, -2) * head_dim**-0.5).softmax(-1)  # (R, H, T, U)
    c = torch.einsum("rhtu,t->rhu", att, w.float())
    return torch.einsum("rhu,rhud->rhd", c, v).reshape(-1, heads * head_dim)


def token_attention_pool_reference(qkv: torch.Tensor, w: torch.Tensor, tokens: int, heads: int,
                                   head_dim: int) -> torch.Tensor:
    """The same function in plain PyTorch, float64, per token (for tests)."""
    x = qkv.double().view(-1, tokens, 3, heads, head_dim)
    q, k, v = x[:, :, 0], x[:, :, 1], x[:, :, 2]  # (R, T, H, Dh)
    scores = torch.einsum("rthd,ruhd->rhtu", q, k) * head_dim**-0.5
    o = torch.einsum("rhtu,ruhd->rthd", scores.softmax(-1), v)  # per-token attention output
    return torch.einsum("rthd,t->rhd", o, w.double()).reshape(-1, heads * head_dim)


# Whether `TokenSelfAttention` ends with `attention_output` (one kernel) when sampling in bf16/fp16 on CUDA, instead
# of the Linear and a separate residual add. Benchmarks switch it (`bench_denoiser_step.py --output-kernel`).
OUTPUT_KERNEL = True
# Whether the output kernels also write the concatenation that follows them in the U-Net's up path (`Denoiser.trunk`:
# an up MLP's output with its skip, this kernel; an up block's output with the next skip, `resblock_kernel`'s
# output kernels; the last attention block's output with the input projection, this kernel), so that no separate
# concatenation copies both halves again (two 608-column copies of ~39 us per compiled IdGen step at 51,200 rows on
# an H100, plus a bias copy for the up MLP's output Linear). Same function. Measured on an H100 at 51,200 rows
# (`bench_denoiser_step.py --cat-output false,true`, compiled stochastic step): IdGen 4.119 -> 4.039 ms, ExpGen
# 1.400 -> 1.371 ms, so on by default. The trunk passes the tails only when sampling under bf16/fp16 autocast with
# the kernels available (`Denoiser._cat_in_kernels`); there, forward hooks see those FiLM blocks and the last up
# attention block return their output with the tail appended, and the up MLPs' output Linear is not called as a
# module.
CAT_OUTPUT = True
# `attention_output`'s launch: rows and output columns per program (at most the output width rounded up to a power
# of two), warps. Programs of one row block are numbered side by side, so its (rows, K) slice of the pooled input
# is read from memory once and from L2 by the others. Measured on an H100 at 51,200 rows, bf16
# (`bench_attention_output.py`): 304 columns 38.2 us (128x64x4 40.6, 64x64x4 41.7, 128x128x8 49.0; the Linear +
# add 66.2 eager, 70.4 compiled), 56 columns 9.0 us (128x64x4 11.2; Linear + add 11.8).
OUTPUT_LAUNCH = {"block_rows": 64, "block_cols": 128, "num_warps": 4}

if triton is not None:

    @triton.jit
    def _attention_output_kernel(p_ptr, w_ptr, b_ptr, x_ptr, t_ptr, out_ptr, M, N, T, stride_x, stride_t,
                                 K: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                 N_PROG: tl.constexpr, T_PROG: tl.constexpr, HAS_X: tl.constexpr):
        # Programs pn < N_PROG of a row block compute output columns; the T_PROG after them copy the tail.
        pid = tl.program_id(0)
        pm, pn = pid // (N_PROG + T_PROG), pid % (N_PROG + T_PROG)
        rows = pm * BM + tl.arange(0, BM)
        row_ok = rows < M
        row_out = rows[:, None].to(tl.int64) * (N + T)
        if pn < N_PROG:
            cols = pn * BN + tl.arange(0, BN)
            ks = tl.arange(0, KP)
            col_ok, k_ok = cols < N, ks < K
            p = tl.load(p_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=col_ok[None, :] & k_ok[:, None],
                        other=0.0)  # (KP, BN): W.T
            acc = tl.dot(p, w, input_precision="ieee", out_dtype=tl.float32)
            b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            m = row_ok[:, None] & col_ok[None, :]
            out = acc + b[None, :]
            if HAS_X:
                x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=m, other=0.0)
                out = x.to(tl.float32) + out
            tl.store(out_ptr + row_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m)
        else:
            cols = (pn - N_PROG) * BN + tl.arange(0, BN)
            m = row_ok[:, None] & (cols < T)[None, :]
            t = tl.load(t_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=m, other=0.0)
            tl.store(out_ptr + row_out + N + cols[None, :], t, mask=m)


@torch.library.custom_op("ofer::attention_output", mutates_args=())
def attention_output(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor | None,
                     tail: torch.Tensor | None = None) -> torch.Tensor:
    """x + pooled @ weight.T + bias, the attention block's output map and residual add, as one kernel; optionally
    followed by `tail` in the same output (the concatenation after it) and without x (any Linear from a narrow
    input: the up MLPs' output Linear, `Denoiser.trunk`).

    Args:
        pooled: (M, K) pooled attention output (or the Linear's input), contiguous, K <= 256.
        weight: (N, K) to_out weight, contiguous, pooled's dtype.
        bias: (N,) the output bias (any float dtype; added in float32, not rounded to the inputs' dtype first).
        x: (M, N) the block's input (the residual), contiguous columns and any row stride, pooled's dtype; or
            None (no residual).
        tail: (M, T) copied unchanged into output columns N ... N + T - 1, contiguous columns and any row stride,
            pooled's dtype; or None (T = 0).

    Returns:
        (M, N + T) in pooled's dtype: the float32 sum x + (pooled @ weight.T + bias), rounded once, then tail. The
        separate Linear and add round twice (the Linear's output, then the sum), so results differ from them by
        up to one rounding of the output; without x it is the Linear's rounding.

    Sampling only (no autograd): `TokenSelfAttention` uses it on CUDA in bf16/fp16 without gradients. Why: the
    Linear's output (M, N) was written and read back by a separate add kernel (2 x 33 us and 3 x 33 us of GEMM
    per compiled IdGen step at 51,200 rows on an H100, BENCHMARKS.md), where this kernel reads pooled and x and
    writes the output once.
    """
    if not available(pooled, 16):
        raise RuntimeError("attention_output needs Triton (shipped with CUDA builds of torch) and a CUDA tensor (or "
                           f"TRITON_INTERPRET=1); got a {pooled.device.type} tensor, Triton "
                           f"{'installed' if triton is not None else 'not installed'}")
    M, K = pooled.shape if pooled.ndim == 2 else (-1, -1)
    if pooled.ndim != 2 or not pooled.is_contiguous() or not 1 <= K <= 256:
        raise ValueError(f"attention_output: pooled must be a contiguous (M, K) tensor, 1 <= K <= 256, got "
                         f"shape {tuple(pooled.shape)} strides {pooled.stride()}")
    N = weight.shape[0] if weight.ndim == 2 else -1
    if weight.shape != (N, K) or not weight.is_contiguous() or weight.dtype != pooled.dtype:
        raise ValueError(f"attention_output: weight must be a contiguous (N, {K}) tensor of pooled's dtype "
                         f"{pooled.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if bias.shape != (N,) or not bias.is_floating_point():
        raise ValueError(f"attention_output: bias must be a float ({N},) tensor, got {tuple(bias.shape)} {bias.dtype}")
    for name, v, width in (("x", x, N), ("tail", tail, None)):
        if v is not None and (v.ndim != 2 or v.shape[0] != M or (width is not None and v.shape[1] != width)
                              or v.dtype != pooled.dtype or v.stride(1) != 1):
            raise ValueError(f"attention_output: {name} must be a ({M}, {width or 'T'}) tensor of pooled's dtype "
                             f"{pooled.dtype} with contiguous columns, got {tuple(v.shape)} {v.dtype} strides "
                             f"{v.stride()}")
    T = 0 if tail is None else tail.shape[1]
    if pooled.is_cuda and torch.cuda.get_device_capability(pooled.device) < (8, 0):
        out = pooled.float() @ weight.float().T + bias.float()
        out = (out if x is None else x.float() + out).to(pooled.dtype)
        return out if tail is None else torch.cat((out, tail), dim=1)
    out = pooled.new_empty(M, N + T)
    if M == 0 or N + T == 0:
        return out
    bm, nw = OUTPUT_LAUNCH["block_rows"], OUTPUT_LAUNCH["num_warps"]
    bn = _output_block_cols(N)
    n_prog, t_prog = triton.cdiv(N, bn), triton.cdiv(T, bn)
    _attention_output_kernel[(triton.cdiv(M, bm) * (n_prog + t_prog),)](
        pooled, weight, bias.contiguous(), pooled if x is None else x, pooled if tail is None else tail, out, M, N, T,
        0 if x is None else x.stride(0), 0 if tail is None else tail.stride(0), K=K, KP=_padded_width(K), BM=bm,
        BN=bn, N_PROG=n_prog, T_PROG=t_prog, HAS_X=x is not None, num_warps=nw)
    return out


def _output_block_cols(n: int) -> int:
    """The output columns per program of `attention_output` for n columns (also used by the test that compiles the
    kernel ahead of time)."""
    return min(OUTPUT_LAUNCH["block_cols"], _padded_width(n))


@attention_output.register_fake
def _(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor | None,
      tail: torch.Tensor | None = None) -> torch.Tensor:
    return pooled.new_empty(pooled.shape[0], weight.shape[0] + (0 if tail is None else tail.shape[1]))


def attention_output_reference(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               x: torch.Tensor | None, tail: torch.Tensor | None = None) -> torch.Tensor:
    """`attention_output` in float64 (for tests)."""
    out = pooled.double() @ weight.double().T + bias.double()
    out = out if x is None else x.double() + out
    return out if tail is None else torch.cat((out, tail.double()), dim=1)

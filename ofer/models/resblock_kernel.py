"""Triton kernels for OFER's FiLM residual block in sampling: each half of the block is one kernel.

`FiLMResBlock` computes, for one GroupNorm group (OFER's setting),

    a   = SiLU(norm1(x W1^T + b1) * (1 + scale) + shift)          (`film_block_in`)
    out = SiLU(norm2(a W2^T + b2)) + skip(x)                      (`film_block_out`; skip: x, or x Ws^T + bs)

Under torch.compile each Linear is a cuBLAS call and each norm (with the FiLM, SiLU and residual add around it) an
inductor kernel that reads the matmul's output back and writes its own: at 51,200 rows of a 304-wide IdGen block
that is five launches and ~10 passes over (rows, 304) bf16 tensors per block, where the data needs two. Here one
program takes a block of rows with all of their channels, so the row statistics of the norm are computed on the
matmul's accumulator in registers: the first kernel reads x and writes a, the second reads a (and x) and writes
the block's output.

Roundings follow the eager block under autocast (`FiLMResBlock.forward`): the matmuls multiply in x's dtype and
accumulate in float32; each Linear's output (bias added) is rounded to x's dtype, as cuBLAS writes it; the norm
statistics are float32 and the normalised, affine output is rounded to x's dtype (the block's `.to(h.dtype)`); the
FiLM product and the first SiLU are float32 (as in the block when scale and shift are float32, the samplers' FiLM;
a bf16 FiLM, as `Denoiser.forward` makes under autocast, is applied here in float32 where the block rounds
(1 + scale) and the product to bf16); the second SiLU is rounded, then the skip is added and the sum rounded.
The statistics are those of the first `channels` columns, the other columns being zero (a `Denoiser.padded` copy:
zero weight rows, biases and norm gains there), so they equal nn.GroupNorm(1) on an unpadded block and
`PaddedGroupNorm` on a padded one.

Columns: a program holds its rows' full width in one or two tensor-core accumulators whose widths are powers of
two (`_column_chunks`: 304 -> 256 + 64, 56 -> 64), masked beyond the width. Weights are re-read from L2 by every
program (a 304 x 608 bf16 weight is 370 KB; 800 programs at 51,200 rows).

Sampling only (no autograd); `FiLMResBlock` takes these kernels when `ENABLED`, the block has one norm group,
no gradient is needed, and the input is a CUDA tensor under bf16/fp16 autocast (or the CPU interpreter, for
tests); inside torch.compile only for blocks of at most `COMPILED_MAX_WIDTH` channels. Triton is optional:
without it the block runs its PyTorch form.

Measured on an H100 at 51,200 rows (BENCHMARKS.md, "Session of 2026-11-27, second"): graphed sampling steps
without torch.compile 12.41 -> 6.31 ms (IdGen) and 4.25 -> 2.23 ms (ExpGen); compiled, the narrow blocks only,
4.86 -> 4.87 and 1.92 -> 1.90 ms. The 304-wide kernels run at 3-4x their memory floor (85 us for `film_block_in`):
ncu shows one program per SM (its 64 x 320 float32 accumulator and three pipeline stages fill the registers and
shared memory), so one program's loads, matmuls and epilogue never overlap with another's; compiled steps keep
cuBLAS for the wide blocks' matmuls and run each norm, with the FiLM and SiLU or the SiLU and residual add around
it, as the same kernels reading the matmul's output (`film_norm_in` / `film_norm_out`, `GEMM=False`; one pass
instead of inductor's statistics and normalisation kernels: compiled IdGen step 4.77 -> 4.58 ms on an H100).
"""
from __future__ import annotations

import os

import torch

__all__ = ["COMPILED_MAX_WIDTH", "ENABLED", "LAUNCH", "NORM_KERNELS", "NORM_LAUNCH", "available", "film_block_in",
           "film_block_out", "film_norm_in", "film_norm_out", "reference_block"]

try:  # Triton is an optional dependency (shipped with CUDA builds of torch)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# FiLMResBlock uses the kernels when this is True (benchmarks switch it off to compare).
ENABLED = True
# Launch per accumulated width (the sum of the column chunks): rows per program, K chunk, warps, pipeline stages.
# Measured on an H100 at 51,200 rows (`benchmarks/bench_resblock_kernel.py --launches`, BENCHMARKS.md): 64 x 32 x 4
# x 3 fastest or within 15% at widths 16-64; the 304-wide blocks (two chunks, 320) 64 x 64 x 8 x 3 (4 warps
# spill registers: the 608 -> 304 block with its skip Linear took 0.8 ms instead of 0.26).
LAUNCH = {16: {"block_rows": 64, "block_k": 32, "num_warps": 4, "stages": 3},
          32: {"block_rows": 64, "block_k": 32, "num_warps": 4, "stages": 3},
          64: {"block_rows": 64, "block_k": 32, "num_warps": 4, "stages": 3},
          128: {"block_rows": 64, "block_k": 64, "num_warps": 4, "stages": 2},
          "wide": {"block_rows": 64, "block_k": 64, "num_warps": 8, "stages": 3}}


# Inside torch.compile, FiLMResBlock takes the kernels only for blocks at most this wide (padded width): there
# inductor's fused norm kernels around cuBLAS matmuls were faster for the 304-wide IdGen blocks (at 51,200 rows on
# an H100: 160 vs 177 us per 304 -> 304 block, 231 vs 257 us per 608 -> 304 block) and slower for the narrow ones
# (16: 17 vs 9 us, 32: 21 vs 12 us, 64 -> 32: 25 vs 15 us, 112 -> 56: 37-39 vs 33-34 us; 56 -> 56: 28-29 vs
# 32 us). Without torch.compile the kernels replace ~8 eager launches per block and win at every width.
COMPILED_MAX_WIDTH = 64
# Wider blocks inside torch.compile: each Linear stays a cuBLAS call and each norm with the FiLM, SiLU and
# residual add around it is one kernel (`film_norm_in` / `film_norm_out`: the kernels above reading the matmul's
# output instead of computing it) when NORM_KERNELS is True, else inductor's kernels. Launch of those kernels: rows
# per program and warps.
NORM_KERNELS = True
NORM_LAUNCH = {"block_rows": 16, "num_warps": 4}
# The compiled kernels of the last launches (their register and spill counts, for benchmarks/bench_resblock_kernel).
LAST_KERNELS: dict = {}


def available(x: torch.Tensor) -> bool:
    """Whether the ops run on tensors like `x` (Triton installed; a CUDA tensor, or TRITON_INTERPRET=1). Static
    properties only, so torch.compile traces it without a graph break."""
    return triton is not None and (x.is_cuda or _INTERPRET)


def _column_chunks(n: int) -> tuple[int, int]:
    """Widths (NA, NB) of the accumulators covering n columns: powers of two >= 16, NB = 0 for one chunk. Two
    chunks where they cover n with less than the next power of two (304 -> 256 + 64 instead of 512)."""
    full = max(16, 1 << (n - 1).bit_length())
    na = max(16, 1 << (n.bit_length() - 1))
    if na >= n:
        return full, 0
    nb = max(16, 1 << (n - na - 1).bit_length())
    return (na, nb) if na + nb < full else (full, 0)


def _launch_key(n: int) -> int | str:
    """The `LAUNCH` entry of an n-wide block: its accumulated width, or "wide"."""
    width = sum(_column_chunks(n))
    return width if width in LAUNCH else "wide"


def _launch(n: int) -> dict:
    return LAUNCH[_launch_key(n)]


if triton is not None:

    @triton.jit
    def _mm(acc_a, acc_b, x_ptr, sx, w_ptr, rows, M, K, N, ca, cb, BK: tl.constexpr, HAS_B: tl.constexpr,
            STAGES: tl.constexpr, PRECISION: tl.constexpr):
        """acc_a += x[rows] @ w[ca].T and acc_b += x[rows] @ w[cb].T over the K columns of x (row stride sx; w:
        (N, K) row-major; rows >= M, weight rows >= N and columns >= K read as zero)."""
        rmask = rows < M
        for k0 in tl.range(0, K, BK, num_stages=STAGES):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < K
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * sx + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0)
            wa = tl.load(w_ptr + ca[:, None] * K + kk[None, :], mask=(ca < N)[:, None] & kmask[None, :], other=0.0)
            acc_a = tl.dot(xt, tl.trans(wa), acc_a, input_precision=PRECISION)
            if HAS_B:
                wb = tl.load(w_ptr + cb[:, None] * K + kk[None, :], mask=(cb < N)[:, None] & kmask[None, :],
                             other=0.0)
                acc_b = tl.dot(xt, tl.trans(wb), acc_b, input_precision=PRECISION)
        return acc_a, acc_b

    @triton.jit
    def _rounded(v, DT: tl.constexpr):
        """v rounded to DT and back to float32 (what a DT tensor between two ops holds)."""
        return v.to(DT).to(tl.float32)

    @triton.jit
    def _biased(acc, b_ptr, cols, N, DT: tl.constexpr):
        """A Linear's output: acc + b[cols], rounded to DT as the matmul writes it."""
        return _rounded(acc + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :], DT)

    @triton.jit
    def _loaded(h_ptr, sh, rows, M, cols, N):
        """h[rows, cols] in float32 (row stride sh), zero outside the (M, N) tensor."""
        m = (rows < M)[:, None] & (cols < N)[None, :]
        return tl.load(h_ptr + rows[:, None].to(tl.int64) * sh + cols[None, :], mask=m, other=0.0).to(tl.float32)

    @triton.jit
    def _linear_norm(x_ptr, sx, w_ptr, b_ptr, g_ptr, be_ptr, M, K, N, C, eps, BM: tl.constexpr, BK: tl.constexpr,
                     NA: tl.constexpr, NB: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr,
                     DT: tl.constexpr, GEMM: tl.constexpr):
        """The program's rows, its column chunks (ca, cb) and norm(x[rows] @ w.T + b) per chunk (na, nb): one group
        over the first C columns (the others are zero), the affine applied and rounded to DT; the Linear's output
        rounded to DT first. NB = 0: one chunk (nb is then na). GEMM false: x is the Linear's output itself, (M, N)
        in DT (row stride sx), read instead of computed (w, b and K unused)."""
        HAS_B: tl.constexpr = NB > 0
        NBB: tl.constexpr = NB if NB > 0 else 16
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        ca = tl.arange(0, NA)
        cb = NA + tl.arange(0, NBB)
        if GEMM:
            acc_a, acc_b = _mm(tl.zeros((BM, NA), tl.float32), tl.zeros((BM, NBB), tl.float32), x_ptr, sx, w_ptr,
                               rows, M, K, N, ca, cb, BK, HAS_B, STAGES, PRECISION)
            ha = _biased(acc_a, b_ptr, ca, N, DT)
        else:
            ha = _loaded(x_ptr, sx, rows, M, ca, N)
        s = tl.sum(ha, 1)
        if HAS_B:
            if GEMM:
                hb = _biased(acc_b, b_ptr, cb, N, DT)
            else:
                hb = _loaded(x_ptr, sx, rows, M, cb, N)
            s += tl.sum(hb, 1)
        mean = s / C
        da = ha - mean[:, None]
        ss = tl.sum(da * da, 1)
        if HAS_B:
            db = hb - mean[:, None]
            ss += tl.sum(db * db, 1)
        # the NA + NB - C zero columns contribute mean^2 each to the sum of squared deviations; take it out
        var = tl.maximum((ss - (NA + NB - C) * mean * mean) / C, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        ga = tl.load(g_ptr + ca, mask=ca < N, other=0.0).to(tl.float32)
        ba = tl.load(be_ptr + ca, mask=ca < N, other=0.0).to(tl.float32)
        na = _rounded(da * rstd[:, None] * ga[None, :] + ba[None, :], DT)
        nb = na
        if HAS_B:
            gb = tl.load(g_ptr + cb, mask=cb < N, other=0.0).to(tl.float32)
            bb = tl.load(be_ptr + cb, mask=cb < N, other=0.0).to(tl.float32)
            nb = _rounded(db * rstd[:, None] * gb[None, :] + bb[None, :], DT)
        return rows, ca, cb, na, nb

    @triton.jit
    def _film_silu(n, rows, M, cols, N, sc_ptr, sh_ptr, sf, rows_per_group):
        """SiLU(n * (1 + scale) + shift), float32, with the FiLM row of each row's group."""
        grp = (rows // rows_per_group).to(tl.int64)
        m = (rows < M)[:, None] & (cols < N)[None, :]
        sc = tl.load(sc_ptr + grp[:, None] * sf + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sh = tl.load(sh_ptr + grp[:, None] * sf + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = n * (1.0 + sc) + sh
        return y / (1.0 + tl.exp(-y))

    @triton.jit
    def _film_block_in_kernel(x_ptr, w_ptr, b_ptr, g_ptr, be_ptr, sc_ptr, sh_ptr, out_ptr, M, K, N, C, sx, sf,
                              rows_per_group, eps, BM: tl.constexpr, BK: tl.constexpr, NA: tl.constexpr,
                              NB: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr,
                              GEMM: tl.constexpr = True):
        DT: tl.constexpr = x_ptr.dtype.element_ty
        rows, ca, cb, na, nb = _linear_norm(x_ptr, sx, w_ptr, b_ptr, g_ptr, be_ptr, M, K, N, C, eps, BM, BK, NA, NB,
                                            STAGES, PRECISION, DT, GEMM)
        rmask = (rows < M)[:, None]
        out = out_ptr + rows[:, None].to(tl.int64) * N
        ya = _film_silu(na, rows, M, ca, N, sc_ptr, sh_ptr, sf, rows_per_group)
        tl.store(out + ca[None, :], ya.to(DT), mask=rmask & (ca < N)[None, :])
        if NB > 0:
            yb = _film_silu(nb, rows, M, cb, N, sc_ptr, sh_ptr, sf, rows_per_group)
            tl.store(out + cb[None, :], yb.to(DT), mask=rmask & (cb < N)[None, :])

    @triton.jit
    def _film_block_out_kernel(a_ptr, x_ptr, w_ptr, b_ptr, g_ptr, be_ptr, ws_ptr, bs_ptr, out_ptr, M, K, N, C, sx,
                               eps, t_ptr, st, BM: tl.constexpr, BK: tl.constexpr, NA: tl.constexpr,
                               NB: tl.constexpr, SKIP_LINEAR: tl.constexpr, STAGES: tl.constexpr,
                               PRECISION: tl.constexpr, GEMM: tl.constexpr = True, TAIL: tl.constexpr = False):
        # TAIL: the output has 2N columns, the last N a copy of the (M, N) tail (row stride st)
        HAS_B: tl.constexpr = NB > 0
        NBB: tl.constexpr = NB if NB > 0 else 16
        DT: tl.constexpr = a_ptr.dtype.element_ty
        rows, ca, cb, na, nb = _linear_norm(a_ptr, N, w_ptr, b_ptr, g_ptr, be_ptr, M, N, N, C, eps, BM, BK, NA, NB,
                                            STAGES, PRECISION, DT, GEMM)
        ya = _rounded(na / (1.0 + tl.exp(-na)), DT)
        yb = ya
        if HAS_B:
            yb = _rounded(nb / (1.0 + tl.exp(-nb)), DT)
        rmask = (rows < M)[:, None]
        xrow = x_ptr + rows[:, None].to(tl.int64) * sx
        if SKIP_LINEAR:  # skip = x Ws^T + bs, rounded like the Linear's output
            sa, sb = _mm(tl.zeros((BM, NA), tl.float32), tl.zeros((BM, NBB), tl.float32), x_ptr, sx, ws_ptr, rows,
                         M, K, N, ca, cb, BK, HAS_B, STAGES, PRECISION)
            sa = _biased(sa, bs_ptr, ca, N, DT)
            if HAS_B:
                sb = _biased(sb, bs_ptr, cb, N, DT)
        else:  # identity skip (K == N)
            sa = tl.load(xrow + ca[None, :], mask=rmask & (ca < N)[None, :], other=0.0).to(tl.float32)
            sb = sa
            if HAS_B:
                sb = tl.load(xrow + cb[None, :], mask=rmask & (cb < N)[None, :], other=0.0).to(tl.float32)
        out = out_ptr + rows[:, None].to(tl.int64) * (2 * N if TAIL else N)
        tl.store(out + ca[None, :], (ya + sa).to(DT), mask=rmask & (ca < N)[None, :])
        if HAS_B:
            tl.store(out + cb[None, :], (yb + sb).to(DT), mask=rmask & (cb < N)[None, :])
        if TAIL:
            trow = t_ptr + rows[:, None].to(tl.int64) * st
            tl.store(out + N + ca[None, :], tl.load(trow + ca[None, :], mask=rmask & (ca < N)[None, :]),
                     mask=rmask & (ca < N)[None, :])
            if HAS_B:
                tl.store(out + N + cb[None, :], tl.load(trow + cb[None, :], mask=rmask & (cb < N)[None, :]),
                         mask=rmask & (cb < N)[None, :])


def _check(name: str, x: torch.Tensor, w: torch.Tensor, vectors: dict[str, torch.Tensor], channels: int) -> None:
    if not available(x):
        raise RuntimeError(f"{name} needs Triton (shipped with CUDA builds of torch) and a CUDA tensor (or "
                           f"TRITON_INTERPRET=1); got a {x.device.type} tensor, Triton "
                           f"{'installed' if triton is not None else 'not installed'}")
    if x.ndim != 2 or x.stride(1) != 1:
        raise ValueError(f"{name}: x must be a row-contiguous (rows, K) tensor, got shape {tuple(x.shape)} strides "
                         f"{x.stride()}")
    n = w.shape[0]
    if w.ndim != 2 or w.shape[1] != x.shape[1] or not w.is_contiguous() or w.dtype != x.dtype:
        raise ValueError(f"{name}: the weight must be a contiguous (N, {x.shape[1]}) tensor of x's dtype {x.dtype}, "
                         f"got {tuple(w.shape)} {w.dtype}")
    for key, v in vectors.items():
        if v.shape != (n,) or not v.is_contiguous():
            raise ValueError(f"{name}: {key} must be a contiguous ({n},) vector, got {tuple(v.shape)}")
    if not 1 <= channels <= n:
        raise ValueError(f"{name}: channels={channels} must be in [1, {n}] (the true width of the norm)")


def _film_groups(name: str, scale: torch.Tensor, shift: torch.Tensor, M: int, N: int) -> int:
    """The number G of FiLM rows for M rows of N channels, after checking scale and shift: (G, N), G dividing M,
    contiguous columns and one row stride."""
    g = scale.shape[0] if scale.ndim == 2 else 0
    if (scale.ndim != 2 or scale.shape != shift.shape or scale.shape[1] != N or g < 1 or M % g
            or scale.stride(1) != 1 or shift.stride() != scale.stride()):
        raise ValueError(f"{name}: scale and shift must be (G, {N}) with G dividing the {M} rows, contiguous "
                         f"columns and one row stride, got {tuple(scale.shape)} strides {scale.stride()} and "
                         f"{tuple(shift.shape)} strides {shift.stride()}")
    return g


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32: exact products (the eager block's)


def _plan(M: int, N: int) -> tuple[int, int, dict, tuple[int]]:
    """Both kernels' launch for M rows of N columns: the column chunks (NA, NB), the LAUNCH entry, the grid."""
    na, nb = _column_chunks(N)
    launch = _launch(N)
    return na, nb, launch, (triton.cdiv(M, launch["block_rows"]),)


@torch.library.custom_op("ofer::film_block_in", mutates_args=())
def film_block_in(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, g1: torch.Tensor, be1: torch.Tensor,
                  scale: torch.Tensor, shift: torch.Tensor, channels: int, eps: float) -> torch.Tensor:
    """First half of a FiLM block: SiLU(norm1(x @ w1.T + b1) * (1 + scale) + shift).

    Args:
        x: (M, K) input, rows contiguous; its dtype is the block's compute dtype (bf16 under autocast).
        w1, b1: the Linear, (N, K) and (N,), in x's dtype.
        g1, be1: the norm's affine weight and bias (N,) (float32).
        scale, shift: (G, N) FiLM rows with G dividing M (row g modulates rows g * M / G ... (g + 1) * M / G - 1),
            columns contiguous, any row stride (the same for both), float32.
        channels: the norm's true width C <= N (columns C..N-1 of x @ w1.T + b1 must be zero: a padded copy).
        eps: the norm's epsilon.

    Returns:
        (M, N) in x's dtype.
    """
    _check("film_block_in", x, w1, {"b1": b1, "g1": g1, "be1": be1}, channels)
    M, N = x.shape[0], w1.shape[0]
    g = _film_groups("film_block_in", scale, shift, M, N)
    out = x.new_empty(M, N)
    if M == 0:
        return out
    na, nb, launch, grid = _plan(M, N)
    LAST_KERNELS["in"] = _film_block_in_kernel[grid](
        x, w1, b1, g1, be1, scale, shift, out, M, x.shape[1], N, channels, x.stride(0), scale.stride(0), M // g, eps,
        BM=launch["block_rows"], BK=launch["block_k"], NA=na, NB=nb, STAGES=launch["stages"],
        PRECISION=_precision(x.dtype), num_warps=launch["num_warps"])
    return out


@film_block_in.register_fake
def _(x, w1, b1, g1, be1, scale, shift, channels, eps):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], w1.shape[0])


@torch.library.custom_op("ofer::film_block_out", mutates_args=())
def film_block_out(a: torch.Tensor, x: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, g2: torch.Tensor,
                   be2: torch.Tensor, ws: torch.Tensor | None, bs: torch.Tensor | None, channels: int,
                   eps: float, tail: torch.Tensor | None = None) -> torch.Tensor:
    """Second half of a FiLM block: SiLU(norm2(a @ w2.T + b2)) + skip, skip = x @ ws.T + bs (ws given) or x;
    optionally followed by `tail` in the same output (the concatenation after the block in the U-Net's up path).

    Args:
        a: (M, N) output of `film_block_in`, contiguous.
        x: (M, K) the block's input, rows contiguous, a's dtype (K == N without ws).
        w2, b2: (N, N), (N,) in a's dtype; g2, be2: the norm's affine (N,) (float32).
        ws, bs: the skip Linear (N, K), (N,) in a's dtype, or None for the identity.
        channels, eps: as `film_block_in`.
        tail: (M, N) copied unchanged into output columns N ... 2N - 1, a's dtype, contiguous columns and any row
            stride; or None.

    Returns:
        (M, N) in a's dtype, or (M, 2N) with the tail.
    """
    _check("film_block_out", a, w2, {"b2": b2, "g2": g2, "be2": be2}, channels)
    _check_tail("film_block_out", tail, a)
    M, N = a.shape
    if not a.is_contiguous() or x.ndim != 2 or x.shape[0] != M or x.stride(1) != 1 or x.dtype != a.dtype:
        raise ValueError(f"film_block_out: a must be contiguous and x a row-contiguous ({M}, K) tensor of a's dtype, "
                         f"got a {tuple(a.shape)} strides {a.stride()}, x {tuple(x.shape)} {x.dtype} strides "
                         f"{x.stride()}")
    if ws is None:
        if x.shape[1] != N or bs is not None:
            raise ValueError(f"film_block_out: without a skip Linear x must have the block's {N} columns (and bs "
                             f"must be None), got x {tuple(x.shape)}")
    else:
        _check("film_block_out (skip)", x, ws, {"bs": bs if bs is not None else torch.empty(0)}, channels)
        if ws.shape[0] != N:
            raise ValueError(f"film_block_out: the skip weight must have {N} rows, got {tuple(ws.shape)}")
    out = a.new_empty(M, N if tail is None else 2 * N)
    if M == 0:
        return out
    na, nb, launch, grid = _plan(M, N)
    LAST_KERNELS["out"] = _film_block_out_kernel[grid](
        a, x, w2, b2, g2, be2, ws if ws is not None else w2, bs if bs is not None else b2, out, M, x.shape[1], N,
        channels, x.stride(0), eps, a if tail is None else tail, 0 if tail is None else tail.stride(0),
        BM=launch["block_rows"], BK=launch["block_k"], NA=na, NB=nb, SKIP_LINEAR=ws is not None,
        STAGES=launch["stages"], PRECISION=_precision(a.dtype), TAIL=tail is not None,
        num_warps=launch["num_warps"])
    return out


@film_block_out.register_fake
def _(a, x, w2, b2, g2, be2, ws, bs, channels, eps, tail=None):  # noqa: ANN001, ANN202
    return a.new_empty(a.shape[0], a.shape[1] * (1 if tail is None else 2))


def _check_tail(name: str, tail: torch.Tensor | None, like: torch.Tensor) -> None:
    """A tail for the output kernels: like's shape and dtype, contiguous columns, any row stride."""
    if tail is not None and (tail.shape != like.shape or tail.dtype != like.dtype or tail.stride(1) != 1):
        raise ValueError(f"{name}: tail must be a {tuple(like.shape)} tensor of {like.dtype} with contiguous "
                         f"columns, got {tuple(tail.shape)} {tail.dtype} strides {tail.stride()}")


def _check_norm(name: str, h: torch.Tensor, vectors: dict[str, torch.Tensor], channels: int, *,
                strided: bool = False) -> None:
    if not available(h):
        raise RuntimeError(f"{name} needs Triton (shipped with CUDA builds of torch) and a CUDA tensor (or "
                           f"TRITON_INTERPRET=1); got a {h.device.type} tensor, Triton "
                           f"{'installed' if triton is not None else 'not installed'}")
    if h.ndim != 2 or (h.stride(1) != 1 if strided else not h.is_contiguous()):
        what = "with contiguous columns" if strided else "contiguous"
        raise ValueError(f"{name}: h must be a (rows, N) tensor {what}, got shape {tuple(h.shape)} strides "
                         f"{h.stride()}")
    n = h.shape[1]
    for key, v in vectors.items():
        if v.shape != (n,) or not v.is_contiguous():
            raise ValueError(f"{name}: {key} must be a contiguous ({n},) vector, got {tuple(v.shape)}")
    if not 1 <= channels <= n:
        raise ValueError(f"{name}: channels={channels} must be in [1, {n}] (the true width of the norm)")


def _norm_plan(M: int, N: int) -> tuple[int, int, dict, tuple[int]]:
    """The norm-only kernels' launch (`NORM_LAUNCH`, no matmul: block_k and stages unused) for M rows of N columns."""
    na, nb = _column_chunks(N)
    launch = {"block_k": 16, "stages": 1, **NORM_LAUNCH}
    return na, nb, launch, (triton.cdiv(M, launch["block_rows"]),)


@torch.library.custom_op("ofer::film_norm_in", mutates_args=())
def film_norm_in(h: torch.Tensor, g1: torch.Tensor, be1: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                 channels: int, eps: float) -> torch.Tensor:
    """`film_block_in` after its matmul: SiLU(norm1(h) * (1 + scale) + shift) for h = the Linear's output (M, N),
    columns contiguous, any row stride (e.g. the first half of one matmul's output for the Linear and the skip),
    in the block's compute dtype (the kernel's roundings from there on). g1, be1, scale, shift, channels, eps as
    in `film_block_in`. Returns (M, N) in h's dtype, contiguous."""
    _check_norm("film_norm_in", h, {"g1": g1, "be1": be1}, channels, strided=True)
    M, N = h.shape
    g = _film_groups("film_norm_in", scale, shift, M, N)
    out = h.new_empty(M, N)
    if M == 0:
        return out
    na, nb, launch, grid = _norm_plan(M, N)
    _film_block_in_kernel[grid](
        h, h, h, g1, be1, scale, shift, out, M, N, N, channels, h.stride(0), scale.stride(0), M // g, eps,
        BM=launch["block_rows"], BK=launch["block_k"], NA=na, NB=nb, STAGES=launch["stages"],
        PRECISION=_precision(h.dtype), GEMM=False, num_warps=launch["num_warps"])
    return out


@film_norm_in.register_fake
def _(h, g1, be1, scale, shift, channels, eps):  # noqa: ANN001, ANN202
    return h.new_empty(h.shape)


@torch.library.custom_op("ofer::film_norm_out", mutates_args=())
def film_norm_out(h: torch.Tensor, skip: torch.Tensor, g2: torch.Tensor, be2: torch.Tensor, channels: int,
                  eps: float, tail: torch.Tensor | None = None) -> torch.Tensor:
    """`film_block_out` after its matmuls: SiLU(norm2(h)) + skip for h = the second Linear's output, (M, N) and
    contiguous, and skip = the block's input or its skip Linear's output, (M, N) with contiguous columns and any
    row stride, both in the block's compute dtype. g2, be2, channels, eps, tail as in `film_block_out`. Returns
    (M, N) in h's dtype, or (M, 2N) with the tail."""
    _check_norm("film_norm_out", h, {"g2": g2, "be2": be2}, channels)
    _check_tail("film_norm_out", tail, h)
    if skip.shape != h.shape or skip.dtype != h.dtype or skip.stride(1) != 1:
        raise ValueError(f"film_norm_out: skip must be a {tuple(h.shape)} tensor of h's dtype {h.dtype} with "
                         f"contiguous columns, got {tuple(skip.shape)} {skip.dtype} strides {skip.stride()}")
    M, N = h.shape
    out = h.new_empty(M, N if tail is None else 2 * N)
    if M == 0:
        return out
    na, nb, launch, grid = _norm_plan(M, N)
    _film_block_out_kernel[grid](
        h, skip, h, h, g2, be2, h, h, out, M, N, N, channels, skip.stride(0), eps, h if tail is None else tail,
        0 if tail is None else tail.stride(0), BM=launch["block_rows"], BK=launch["block_k"], NA=na, NB=nb,
        SKIP_LINEAR=False, STAGES=launch["stages"], PRECISION=_precision(h.dtype), GEMM=False, TAIL=tail is not None,
        num_warps=launch["num_warps"])
    return out


@film_norm_out.register_fake
def _(h, skip, g2, be2, channels, eps, tail=None):  # noqa: ANN001, ANN202
    return h.new_empty(h.shape[0], h.shape[1] * (1 if tail is None else 2))


def reference_block(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, g1: torch.Tensor, be1: torch.Tensor,
                    scale: torch.Tensor, shift: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, g2: torch.Tensor,
                    be2: torch.Tensor, ws: torch.Tensor | None, bs: torch.Tensor | None, channels: int,
                    eps: float) -> torch.Tensor:
    """The whole block in float64 PyTorch, without roundings (for tests): statistics over the first `channels`
    columns, FiLM rows broadcast over their groups."""
    d = torch.float64
    x, g = x.to(d), scale.shape[0]

    def norm(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        t = h[:, :channels]
        mean = t.mean(-1, keepdim=True)
        var = t.var(-1, unbiased=False, keepdim=True)
        return (h - mean) / torch.sqrt(var + eps) * w.to(d) + b.to(d)

    h = norm(x @ w1.to(d).T + b1.to(d), g1, be1)
    h = h.view(g, -1, h.shape[1]) * (1 + scale.to(d)[:, None]) + shift.to(d)[:, None]
    h = torch.nn.functional.silu(h.view(x.shape[0], -1))
    h = torch.nn.functional.silu(norm(h @ w2.to(d).T + b2.to(d), g2, be2))
    return h + (x if ws is None else x @ ws.to(d).T + bs.to(d))

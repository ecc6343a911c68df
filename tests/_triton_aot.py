"""Compile a Triton (or Gluon) kernel ahead of time for a GPU this machine does not have, as a real launch would.

Triton compiles each launch for its arguments: a pointer that is 16-byte aligned, or an integer divisible by 16, is
compiled as such (`tt.divisibility`). Only then does it vectorize loads and software-pipeline loops through shared
memory, so a compile without those hints is not the code a GPU runs: it once showed 65 KB of shared memory for a
kernel whose real launches asked for 434 KB and failed (commit 3712be2). `compile_sm90` compiles both ways: plain (an
odd stride or width in some launch), and with every pointer aligned and every integer divisible by 16, the most
specialized launch these constexprs allow, which pipelines the most and so needs the most shared memory. It checks
that this one fits the card.
"""
from __future__ import annotations

# Shared memory per block with the opt-in Triton uses: 227 KB on an H100 (sm_90), 163 KB on an A100 (sm_80).
SHARED_BYTES = {90: 232_448, 80: 166_912}


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, *, arch: int = 90,
                 options: dict | None = None) -> tuple:
    """(plain, specialized) compiled kernels of `fn` (a `triton.jit` or `gluon.jit` function) for sm_`arch`:
    `signature` maps every parameter name to its type ("*bf16", "i32", ..., "constexpr"), `constexprs` gives the
    constexpr values. Asserts that the specialized form fits the card's shared memory (SHARED_BYTES)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource
    try:  # Gluon: Triton >= 3.5
        from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
    except ImportError:
        pass
    else:
        source = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in signature.items() if kind.startswith("*") or kind == "i32"}
    opts = {"num_warps": num_warps, **(options or {})}
    kernels = tuple(triton.compile(source(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                   target=GPUTarget("cuda", arch, 32), options=opts)
                    for attrs in (None, aligned))
    shared = kernels[1].metadata.shared
    assert shared <= SHARED_BYTES[arch], (f"{fn.__name__} {constexprs}: {shared} bytes of shared memory, sm_{arch} "
                                          f"has {SHARED_BYTES[arch]}")
    return kernels

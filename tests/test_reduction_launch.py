"""ofer/reduction_launch.py: one row per warp for inductor's 257-512-column persistent reductions.

CPU: the rule's cases, the wrapper around torch's real heuristic (its premise, two rows per warp at a size hint of
512, is read from inductor itself, not assumed), which kernels compile in this process, install/restore of the
process-wide patch. GPU: a compiled 304-wide norm with three reductions per row, forward and backward, gets its
kernels relaunched (so inductor compiled them in this process, where the wrapper runs), one with a single reduction
does not, and both compute what eager PyTorch does."""
from __future__ import annotations

import pytest
import torch

from ofer import reduction_launch as rl
from ofer.reduction_launch import Relaunch, one_row_per_warp, relaunch_for, wrap_heuristic

th = pytest.importorskip("torch._inductor.runtime.triton_heuristics")
hints = pytest.importorskip("torch._inductor.runtime.hints")
if not hasattr(th, "_persistent_reduction_configs"):
    pytest.skip(f"torch {torch.__version__} has no _persistent_reduction_configs", allow_module_level=True)


def _h100() -> object:
    """Device properties of an H100 (SXM) as inductor records them, so the CUDA heuristic runs without a GPU."""
    return hints.DeviceProperties(type="cuda", index=0, multi_processor_count=132, cc=90, major=9,
                                  regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                                  max_threads_per_block=1024, warp_size=32)


def _inductor_configs(rows: int, columns_hint: int, name: str = "triton_per_fused_k_0"):
    return th._persistent_reduction_configs({"x": rows, "r0_": columns_hint}, hints.ReductionHint.INNER,
                                            {"kernel_name": name}, {"device": _h100()})


@pytest.mark.parametrize(
    ("size_hints", "launches", "expected"),
    [
        ({"x": 65536, "r0_": 512}, [(2, 1)], (1, 1)),  # the IdGen norms (304 columns), reduction count not known
        ({"x": 4096, "r": 512}, [(2, 1)], (1, 1)),  # older torch names the reduction hint "r"
        ({"x": 2048, "r0_": 512}, [(2, 1)], None),  # fewer rows than measured
        ({"x": 65536, "r0_": 1024}, [(2, 1)], None),  # another width
        ({"x": 65536, "r0_": 256}, [(4, 1)], None),
        ({"x": 65536, "r0_": 512}, [(1, 1)], None),  # inductor's launch is not the one measured
        ({"x": 65536, "r0_": 512}, [(2, 2)], None),
        ({"x": 65536, "r0_": 512}, [(2, 1), (8, 4)], None),  # several configs: inductor autotunes, leave it
        ({"x": 65536, "r0_": 16, "r1_": 32}, [(2, 1)], (1, 1)),  # two reduction dimensions: their product
    ],
)
def test_rule_changes_only_the_measured_launch(size_hints, launches, expected) -> None:
    assert relaunch_for(size_hints, launches) == expected


@pytest.mark.parametrize(("reductions", "expected"), [(1, None), (2, None), (3, (1, 1)), (4, (1, 1)), (None, (1, 1))])
def test_rule_keeps_inductors_launch_for_kernels_with_few_reductions(reductions, expected) -> None:
    """The forward norm kernels (2 reductions) measured faster at inductor's launch, the backward ones (3-4) slower."""
    assert rl.MIN_REDUCTIONS == 3
    assert relaunch_for({"x": 65536, "r0_": 512}, [(2, 1)], reductions) == expected


def test_inductor_launches_two_rows_per_warp_at_512_and_the_wrapper_one() -> None:
    """Torch's own CUDA heuristic (run on CPU with H100 properties) picks XBLOCK 2 / 1 warp for 257-512-column
    rows (our premise), and the wrapped heuristic returns one config of XBLOCK 1 / 1 warp with everything else of
    inductor's config kept, and records it; other widths come back as inductor made them."""
    before = _inductor_configs(65536, 512)
    assert [(c.kwargs["XBLOCK"], c.num_warps) for c in before] == [(2, 1)]
    records: list[Relaunch] = []
    wrapped = wrap_heuristic(th._persistent_reduction_configs, records)
    after = wrapped({"x": 65536, "r0_": 512}, hints.ReductionHint.INNER,
                    {"kernel_name": "triton_per_fused_k_7", "num_load": 11, "num_reduction": 4}, {"device": _h100()})
    assert len(after) == 1 and after[0].kwargs == {**before[0].kwargs, "XBLOCK": 1} and after[0].num_warps == 1
    assert after[0].num_stages == before[0].num_stages
    assert before[0].kwargs["XBLOCK"] == 2  # inductor's own config object is not modified in place
    assert records == [Relaunch(kernel="triton_per_fused_k_7", rows=65536, columns=512, before=(2, 1), after=(1, 1),
                                loads=11, reductions=4)]
    for rows, hint, reductions in ((65536, 1024, 4), (65536, 256, 4), (512, 512, 4), (65536, 512, 2)):
        untouched = wrapped({"x": rows, "r0_": hint}, hints.ReductionHint.INNER,
                            {"kernel_name": "k", "num_reduction": reductions}, {"device": _h100()})
        assert [(c.kwargs, c.num_warps) for c in untouched] == [
            (c.kwargs, c.num_warps) for c in _inductor_configs(rows, hint)]
    assert len(records) == 1


def test_wrapper_leaves_configs_it_does_not_know() -> None:
    odd = [object()]
    records: list[Relaunch] = []
    assert wrap_heuristic(lambda *a, **k: odd, records)({"x": 65536, "r0_": 512}) is odd
    assert records == []


# the head of a persistent reduction as inductor generates it (torch 2.14; 2.11 names the reduction hint "r")
_SOURCE = """
import triton
from torch._inductor.runtime import triton_helpers, triton_heuristics

@triton_heuristics.persistent_reduction(
    size_hints={{'x': {rows}, 'r0_': {hint}}},
    reduction_hint=ReductionHint.INNER,
    filename=__file__,
    triton_meta={{'signature': {{'in_out_ptr0': '*fp32'}}}},
    inductor_meta={{'autotune_hints': set(), 'kernel_name': 'triton_per_fused_k_0', 'num_load': 8,
                   'num_reduction': {reductions}}},
)
@triton.jit
def triton_per_fused_k_0(in_out_ptr0, xnumel, r0_numel, XBLOCK: tl.constexpr):
    pass
"""


def _source(rows: int | str = 65536, hint: int = 512, reductions: int = 4) -> str:
    return _SOURCE.format(rows=rows, hint=hint, reductions=reductions)


def test_kernels_compiled_in_process_are_the_ones_the_rule_may_change() -> None:
    assert rl.may_relaunch(_source())
    assert rl.may_relaunch(_source(reductions=3))
    assert rl.may_relaunch(_source().replace("'r0_'", "'r'"))
    assert not rl.may_relaunch(_source(reductions=2))  # the forward norms: inductor's launch, in its workers
    assert rl.may_relaunch(_source(reductions=2).replace("'num_reduction': 2", "'num_store': 2"))  # count unknown
    assert not rl.may_relaunch(_source(hint=1024))
    assert not rl.may_relaunch(_source(rows=1024))
    assert not rl.may_relaunch(_source().replace("persistent_reduction(", "reduction("))
    assert not rl.may_relaunch(_source().replace("size_hints=", "sizes="))
    assert not rl.may_relaunch(_source(rows="ks0"))  # not a literal: leave it to inductor


def test_kernel_hints_read_the_size_hints_and_reduction_count() -> None:
    assert rl.kernel_hints(_source(reductions=3)) == ({"x": 65536, "r0_": 512}, 3)
    assert rl.kernel_hints(_source().replace("'num_reduction': 4", "'num_store': 4")) == ({"x": 65536, "r0_": 512},
                                                                                          None)
    assert rl.kernel_hints(_source(rows="ks0")) == (None, 4)
    assert rl.kernel_hints(_source().replace("persistent_reduction(", "reduction(")) == (None, None)


def test_triton_compile_wrapper_compiles_only_those_in_process() -> None:
    """The wrapped AsyncCompile.triton runs inductor's with compile_threads 1 (no worker pool) for a kernel the rule
    may change and with the configured threads for any other, and restores the setting after the call."""
    from torch._inductor import config as inductor_config

    seen = []

    def original(self, kernel_name, source_code, device_str="cuda"):
        seen.append((kernel_name, inductor_config.compile_threads, device_str))
        return kernel_name

    wrapped = rl.wrap_triton_compile(original, inductor_config)
    with inductor_config.patch(compile_threads=8):
        assert wrapped(None, "a", _source()) == "a"
        assert wrapped(None, "b", _source(hint=1024), "cuda") == "b"
        assert wrapped(None, "c", "@triton_heuristics.pointwise(size_hints={'x': 65536})", device_str="xpu") == "c"
        assert inductor_config.compile_threads == 8
    assert seen == [("a", 1, "cuda"), ("b", 8, "cuda"), ("c", 8, "xpu")]


def test_context_installs_and_restores() -> None:
    from torch._inductor import config as inductor_config
    from torch._inductor.async_compile import AsyncCompile

    original = th._persistent_reduction_configs
    compile_triton = AsyncCompile.triton
    threads = inductor_config.compile_threads
    with one_row_per_warp() as records:
        assert records == [] and th._persistent_reduction_configs is not original
        assert th._persistent_reduction_configs.__wrapped__ is original
        assert AsyncCompile.triton.__wrapped__ is compile_triton
        assert inductor_config.compile_threads == threads  # the other kernels still compile in the worker pool
        configs = th._persistent_reduction_configs({"x": 8192, "r0_": 512}, hints.ReductionHint.INNER,
                                                   {"kernel_name": "k"}, {"device": _h100()})
        assert [(c.kwargs["XBLOCK"], c.num_warps) for c in configs] == [(1, 1)] and len(records) == 1
        with one_row_per_warp() as inner:  # nested: the same patch, the same list
            assert inner is records and th._persistent_reduction_configs.__wrapped__ is original
            assert AsyncCompile.triton.__wrapped__ is compile_triton
        assert th._persistent_reduction_configs.__wrapped__ is original
    assert th._persistent_reduction_configs is original and AsyncCompile.triton is compile_triton
    with pytest.raises(RuntimeError, match="boom"), one_row_per_warp():
        raise RuntimeError("boom")
    assert th._persistent_reduction_configs is original and AsyncCompile.triton is compile_triton
    assert inductor_config.compile_threads == threads


def test_context_without_a_compile_hook_compiles_everything_in_process(monkeypatch) -> None:
    from torch._inductor import config as inductor_config
    from torch._inductor.async_compile import AsyncCompile

    monkeypatch.delattr(AsyncCompile, "triton")
    threads = inductor_config.compile_threads
    with one_row_per_warp() as records:
        assert records == [] and inductor_config.compile_threads == 1
    assert inductor_config.compile_threads == threads and not hasattr(AsyncCompile, "triton")


def test_context_without_the_heuristic_changes_nothing(monkeypatch) -> None:
    monkeypatch.delattr(th, "_persistent_reduction_configs")
    with one_row_per_warp() as records:
        assert records is None
    assert not hasattr(th, "_persistent_reduction_configs")


def _rms_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """RMS norm with a gain and SiLU (bf16 in, float32 statistics, as the denoisers' norms): one reduction per row."""
    xf = x.float()
    return torch.nn.functional.silu(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w)


def _rms_then_standardise(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The RMS norm, then each row standardised (mean, then mean square): three reductions per row in one kernel."""
    y = _rms_silu(x, w)
    y = y - y.mean(-1, keepdim=True)
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)


def _eager_and_compiled(fn) -> dict:
    """fn's output, input and weight gradients over 8,192 x 304 and the kernels relaunched, eager and compiled."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rl.MIN_ROWS * 2, 304, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(304, device="cuda", generator=gen)
    grad_out = torch.randn(x.shape, device="cuda", generator=gen)
    results = {}
    for name, f in (("eager", fn), ("compiled", torch.compile(fn, dynamic=False))):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with one_row_per_warp() as records:
            y = f(xi, wi)
            y.backward(grad_out)
        results[name] = (y.detach(), xi.grad.float(), wi.grad, list(records))
    return results


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("fn", "relaunches"), [(_rms_then_standardise, True), (_rms_silu, False)])
def test_compiled_norms_relaunched_by_reduction_count_and_compute_the_same(fn, relaunches, monkeypatch,
                                                                           tmp_path) -> None:
    """Over 8,192 x 304, forward and backward compiled under the context (inductor's worker pool on, as by default):
    the kernels with >= 3 reductions per row were relaunched one row per warp (recorded: so they were compiled in this
    process, where the wrapper runs; the count read from inductor's own metadata), a norm with fewer reductions
    keeps inductor's launch, and output and gradients match eager PyTorch's. A fresh inductor cache and no FX graph
    cache: a kernel taken from a cache keeps the launch it was compiled with (nothing to record)."""
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    try:
        with inductor_config.patch(fx_graph_cache=False):
            results = _eager_and_compiled(fn)
    finally:
        torch._dynamo.reset()
    relaunched = results["compiled"][3]
    assert results["eager"][3] == []
    if relaunches:
        assert relaunched, "no kernel relaunched: compiled in a worker?"
        assert all(r.columns == 512 and r.before == (2, 1) and r.after == (1, 1) for r in relaunched)
        assert all(r.reductions is not None and r.reductions >= rl.MIN_REDUCTIONS for r in relaunched), relaunched
    else:
        assert relaunched == []
    for got, want in zip(results["compiled"][:3], results["eager"][:3]):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)

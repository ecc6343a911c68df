"""benchmarks/trace_kernels.py on a hand-made Chrome trace: kernel time by kind, and each GEMM kernel charged
to the innermost CPU op that launched it (the numbers in BENCHMARKS.md's H100 profile come from it)."""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import trace_kernels  # noqa: E402


def _trace() -> list[dict]:
    cpu = [  # an outer op around an inner one on thread 1, another op on thread 2 at the same time
        {"cat": "cpu_op", "name": "aten::linear", "tid": 1, "ts": 0, "dur": 100, "args": {"Input Dims": [[8, 4]]}},
        {"cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 10, "dur": 50, "args": {"Input Dims": [[8, 4], [4, 2]]}},
        {"cat": "cpu_op", "name": "aten::addmm", "tid": 2, "ts": 0, "dur": 100, "args": {"Input Dims": [[2], [8, 4]]}},
    ]
    launches = [
        {"cat": "cuda_driver", "name": "cuLaunchKernelEx", "tid": 1, "ts": 20, "dur": 5, "args": {"correlation": 1}},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 70, "dur": 5, "args": {"correlation": 2}},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 2, "ts": 30, "dur": 5, "args": {"correlation": 3}},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 80, "dur": 5, "args": {"correlation": 4}},
    ]
    kernels = [
        {"cat": "kernel", "name": "nvjet_sm90_tst_64x64", "ts": 200, "dur": 30.0, "args": {"correlation": 1}},
        {"cat": "kernel", "name": "void cublasLt::splitKreduce_kernel<>", "ts": 240, "dur": 2.0,
         "args": {"correlation": 2}},
        {"cat": "kernel", "name": "nvjet_sm90_tst_128x64", "ts": 250, "dur": 10.0, "args": {"correlation": 3}},
        {"cat": "kernel", "name": "_token_attention_pool_kernel", "ts": 270, "dur": 7.0, "args": {"correlation": 4}},
        {"cat": "kernel", "name": "triton_per_fused_native_group_norm_0", "ts": 280, "dur": 5.0, "args": {}},
        {"cat": "kernel", "name": "void at::native::elementwise_kernel<>", "ts": 290, "dur": 1.0, "args": {}},
    ]
    return cpu + launches + kernels


def test_kernel_time_by_kind_and_gemms_by_innermost_launching_op() -> None:
    s = trace_kernels.summarize(_trace())
    assert s["total_us"] == pytest.approx(55.0)
    assert s["by_kind"] == pytest.approx({"gemm": 42.0, "attention": 7.0, "inductor": 5.0, "other": 1.0})
    by_op = {op: v for (op, _), v in s["gemm_by_op"].items()}
    # the first kernel was launched inside aten::mm (inside aten::linear); the split-K reduction by the launch
    # at ts 70, outside aten::mm but inside aten::linear; the third on the other thread
    assert by_op == {"aten::mm": [30.0, 1], "aten::linear": [2.0, 1], "aten::addmm": [10.0, 1]}
    assert ("aten::mm", str([[8, 4], [4, 2]])) in s["gemm_by_op"]


def test_other_kernels_by_launching_op_and_innermost_frame_of_the_package() -> None:
    """Kernels of kind "other" (neither cuBLAS, our attention kernels nor inductor's) are charged to the launching
    CPU op and to the innermost Python frame of this package around the launch (traces recorded with_stack):
    frames of other code are skipped, and a launch outside any of our frames is charged to "?"."""
    frames = [
        {"cat": "python_function", "name": "ofer/fast_sampling.py(140): _step_eager", "tid": 1, "ts": 0, "dur": 300},
        {"cat": "python_function", "name": "ofer/models/unet1d.py(99): forward", "tid": 1, "ts": 90, "dur": 60},
        {"cat": "python_function", "name": "torch/nn/functional.py(5): pad", "tid": 1, "ts": 95, "dur": 20},
    ]
    cpu = [{"cat": "cpu_op", "name": "aten::copy_", "tid": 1, "ts": 96, "dur": 10, "args": {"Input Dims": [[4, 4]]}},
           {"cat": "cpu_op", "name": "aten::fill_", "tid": 2, "ts": 0, "dur": 10, "args": {"Input Dims": [[4]]}}]
    launches = [
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 100, "dur": 2, "args": {"correlation": 7}},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 200, "dur": 2, "args": {"correlation": 8}},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 2, "ts": 5, "dur": 2, "args": {"correlation": 9}},
    ]
    kernels = [
        {"cat": "kernel", "name": "void at::native::elementwise_kernel<copy>", "ts": 400, "dur": 4.0,
         "args": {"correlation": 7}},
        {"cat": "kernel", "name": "_film_block_in_kernel", "ts": 410, "dur": 6.0, "args": {"correlation": 8}},
        {"cat": "kernel", "name": "void at::native::vectorized_elementwise_kernel<fill>", "ts": 420, "dur": 1.0,
         "args": {"correlation": 9}},
    ]
    s = trace_kernels.summarize(frames + cpu + launches + kernels)
    assert s["other_by_frame"] == {
        ("aten::copy_", str([[4, 4]]), "ofer/models/unet1d.py(99): forward"): [4.0, 1],
        ("?", "?", "ofer/fast_sampling.py(140): _step_eager"): [6.0, 1],
        ("aten::fill_", str([[4]]), "?"): [1.0, 1],
    }


def test_reads_gzip_and_names_a_bad_file(tmp_path: Path, capsys) -> None:
    good = tmp_path / "t.json.gz"
    with gzip.open(good, "wt") as f:
        json.dump({"traceEvents": _trace()}, f)
    sys.argv = ["trace_kernels.py", str(good), "--top", "3"]
    trace_kernels.main()
    out = capsys.readouterr().out
    assert "0.06 ms of kernel time" in out and "aten::mm [[8, 4], [4, 2]]" in out
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json: not a readable Chrome trace"):
        trace_kernels.load_trace(bad)
    (tmp_path / "list.json").write_text(json.dumps({"traceEvents": 3}))
    with pytest.raises(SystemExit, match="expected a Chrome trace"):
        trace_kernels.load_trace(tmp_path / "list.json")


def test_idle_gaps_by_hand() -> None:
    """GPU busy time is the union of the kernel intervals (overlapping kernels counted once), gaps of 5 us or more
    name the kernels on either side and the longest CPU ops that started inside them. By hand: kernels [0, 10],
    [5, 25] (overlapping), [40, 50], [52, 53]: busy 25 + 10 + 1 = 36 us of a 53 us span, one 15 us gap (the 2 us
    one is below the threshold)."""
    events = [
        {"cat": "kernel", "name": "a", "ts": 0, "dur": 10},
        {"cat": "kernel", "name": "b", "ts": 5, "dur": 20},
        {"cat": "kernel", "name": "c", "ts": 40, "dur": 10},
        {"cat": "kernel", "name": "d", "ts": 52, "dur": 1},
        {"cat": "cpu_op", "name": "aten::item", "ts": 27, "dur": 9},
        {"cat": "cpu_op", "name": "aten::add", "ts": 30, "dur": 2},
        {"cat": "cpu_op", "name": "aten::mul", "ts": 45, "dur": 30},  # after the gap: not listed
    ]
    r = trace_kernels.idle_gaps(events)
    assert r["busy_us"] == 36 and r["span_us"] == 53
    assert r["gaps"] == [{"us": 15, "before": "b", "after": "c", "cpu_ops": ["aten::item (9 us)", "aten::add (2 us)"]}]
    assert trace_kernels.idle_gaps([]) == {"busy_us": 0.0, "span_us": 0.0, "gaps": []}


def test_kernels_report_their_most_common_launch_shape(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-kernel table shows each kernel's most common launch (blocks x threads per block, registers per
    thread), as the trace records it: a 1-warp reduction reads '[32768 x 32, 254 regs]'. Kernels recorded without
    a launch shape get none."""
    def kernel(ts: int, grid: list[int], block: list[int], regs: int) -> dict:
        return {"cat": "kernel", "name": "triton_per_fused_norm_backward_11", "ts": ts, "dur": 200.0,
                "args": {"grid": grid, "block": block, "registers per thread": regs}}

    events = [kernel(0, [32768, 1, 1], [32, 1, 1], 254), kernel(300, [32768, 1, 1], [32, 1, 1], 254),
              kernel(600, [8192, 2, 1], [64, 2, 1], 80),
              {"cat": "kernel", "name": "memcpy128", "ts": 900, "dur": 5.0, "args": {}}]
    s = trace_kernels.summarize(events)
    assert s["launch_by_name"] == {"triton_per_fused_norm_backward_11": ((32768, 1, 1), (32, 1, 1), 254)}
    assert trace_kernels.launch_text(((8192, 2, 1), (64, 2, 1), 80)) == "  [16384 x 128, 80 regs]"
    assert trace_kernels.launch_text(((4, 1, 1), (128, 1, 1), None)) == "  [4 x 128]"
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    monkeypatch.setattr(sys, "argv", ["trace_kernels.py", str(path)])
    trace_kernels.main()
    lines = capsys.readouterr().out.splitlines()
    assert any(line.endswith("triton_per_fused_norm_backward_11  [32768 x 32, 254 regs]") for line in lines)
    assert any(line.endswith("  memcpy128") for line in lines)

"""benchmarks/bench_allreduce.py: a two-process gloo run on the CPU through torchrun (every row present, the sums
checked inside), its check of the result catching a wrong sum, and its errors for bad arguments."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("bench_allreduce", ROOT / "benchmarks" / "bench_allreduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_allreduce_runs_two_gloo_processes(tmp_path: Path) -> None:
    out = tmp_path / "allreduce.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "benchmarks/bench_allreduce.py", "--cpu", "--elements", "1000,64", "--calls", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, check=False, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["backend"] == "gloo"
    rows = res["rows"]
    assert [(r["dtype"], r["elements"]) for r in rows] == [("float32", 1000), ("float32", 64), ("bfloat16", 1000),
                                                           ("bfloat16", 64)]
    for r in rows:
        itemsize = 4 if r["dtype"] == "float32" else 2
        assert r["mb"] == pytest.approx(r["elements"] * itemsize / 1e6)
        assert r["ms_per_call"] > 0
        # bus bandwidth of two ranks: 2 (n - 1) / n = 1 times the algorithm bandwidth
        assert r["busbw_gb_s"] == pytest.approx(r["algbw_gb_s"])
        assert r["algbw_gb_s"] == pytest.approx(r["mb"] / r["ms_per_call"])


def test_time_all_reduce_rejects_a_wrong_sum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _module()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert mod.time_all_reduce(100, torch.float32, torch.device("cpu"), calls=1, warmup=1) > 0
        monkeypatch.setattr(dist, "all_reduce", lambda buf: buf.mul_(2))  # a reduction that doubles: not the sum
        with pytest.raises(RuntimeError, match=r"all_reduce of 100 torch.float32 elements gave \[2.0"):
            mod.time_all_reduce(100, torch.float32, torch.device("cpu"), calls=1, warmup=1)
    finally:
        dist.destroy_process_group()


def test_bench_allreduce_rejects_bad_arguments() -> None:
    mod = _module()
    for spec in ("", "12,x", "0", "-4,8"):
        with pytest.raises(SystemExit, match="--elements: expected a comma list of positive integers"):
            mod.parse_elements(spec)
    assert mod.parse_elements("12450000,3160000") == [12_450_000, 3_160_000]
    cmd = [sys.executable, "benchmarks/bench_allreduce.py", "--cpu", "--dtypes", "float16"]
    proc = subprocess.run(cmd, cwd=ROOT, check=False, timeout=120, capture_output=True, text=True)
    assert proc.returncode == 2 and "--dtypes: unknown ['float16']" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "benchmarks/bench_allreduce.py", "--cpu"], cwd=ROOT, check=False,
                          timeout=120, capture_output=True, text=True)
    assert proc.returncode == 2 and "run under torchrun" in proc.stderr, proc.stderr

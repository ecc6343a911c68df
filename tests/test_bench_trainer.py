"""benchmarks/bench_trainer.py end to end on the CPU: the smoke run of its docstring with a generator job and the
IdRank job (the real RankerTask on cached pools, FLAME decoding included). The script reports a failing row as an
error and goes on, so this checks every row for one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_trainer_times_a_generator_and_idrank_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "trainer.json"
    cmd = [sys.executable, "benchmarks/bench_trainer.py", "--cpu", "--jobs", "idgen,idrank", "--rows-per-item", "8",
           "--items-per-step", "4", "--items", "8", "--candidates", "6", "--rank-batch", "2", "--steps", "6",
           "--warmup", "2", "--compile-scope", "none", "--inductor", "default,max_autotune_pointwise=true", "--json",
           str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["job"] for r in rows] == ["idgen", "idrank"]
    for r in rows:
        assert "error" not in r, r
        assert r["s_per_step"] > 0
        # the mean over the timed steps lies within their spread (steps 3-5 of 6: three durations)
        assert 0 < r["s_per_step_min"] <= r["s_per_step_median"] <= r["s_per_step_max"]
        assert r["s_per_step_min"] <= r["s_per_step"] <= r["s_per_step_max"]
    assert rows[0]["rows_per_step"] == 4 * 8
    assert rows[1]["rows_per_step"] == 2 * 6  # images x candidates
    assert rows[1]["params"] == 59_505_986  # the paper-sized IdRanker (1,785 face vertices)
    assert all(r["inductor_extra"] == {"max_autotune_pointwise": True} for r in rows)
    assert all(r["grad_sync"] == "none" and r["world_size"] == 1 for r in rows)  # one process: nothing synced


def test_bench_trainer_rejects_a_malformed_inductor_option() -> None:
    for spec in ("max_autotune_pointwise", "default,max_autotune_pointwise"):
        cmd = [sys.executable, "benchmarks/bench_trainer.py", "--cpu", "--inductor", spec]
        proc = subprocess.run(cmd, check=False, cwd=ROOT, timeout=300, capture_output=True, text=True)
        assert proc.returncode == 2
        assert "--inductor 'max_autotune_pointwise': expected key=value" in proc.stderr, proc.stderr


def test_bench_trainer_min_reductions_is_checked_and_recorded(tmp_path: Path) -> None:
    """--min-reductions (benchmark-only: the relaunch rule's threshold in the benchmark's process) rejects a negative
    count and a launch it does not apply to, and the JSON records the threshold the run used."""
    base = [sys.executable, "benchmarks/bench_trainer.py", "--cpu", "--jobs", "idgen"]
    for extra, message in ((["--min-reductions", "-1"], "--min-reductions must be >= 0, got -1"),
                           (["--min-reductions", "0", "--reduction-launch", "inductor"],
                            "--min-reductions needs --reduction-launch one_row")):
        proc = subprocess.run(base + extra, check=False, cwd=ROOT, timeout=300, capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    out = tmp_path / "trainer.json"
    cmd = base + ["--rows-per-item", "8", "--items-per-step", "2", "--items", "4", "--steps", "4", "--warmup", "1",
                  "--graph", "false", "--min-reductions", "0", "--inductor", "max_autotune_pointwise=false",
                  "--json", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600, capture_output=True)
    data = json.loads(out.read_text())
    assert data["args"]["min_reductions"] == 0 and data["rows"][0]["min_reductions"] == 0
    assert data["rows"][0]["inductor_extra"] == {"max_autotune_pointwise": False}  # key=value alone: added too


def test_bench_trainer_host_times_the_loops_own_work(tmp_path: Path) -> None:
    """benchmarks/bench_trainer_host.py (the trainer's host work per step, the model's work stubbed out) runs on the
    CPU and reports one positive time per job; it fails if the trainer methods it stubs are renamed."""
    out = tmp_path / "host.json"
    cmd = [sys.executable, "benchmarks/bench_trainer_host.py", "--jobs", "expgen", "--steps", "12", "--warmup", "2",
           "--json", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["job"] for r in rows] == ["expgen"] and rows[0]["host_us_per_step"] > 0


def test_bench_trainer_under_torchrun_runs_each_grad_sync_on_two_gloo_processes(tmp_path: Path) -> None:
    """Two processes on the CPU: a row per --grad-sync and --grad-sync-dtype value, each trained on both (global
    batch 2 x 4 items), samples/s counting both; rank 0 alone writes the JSON. Rows name what auto resolved to: the
    sync (flat, with the default flat params), the compile scope (the whole loss, or the model alone inside DDP) and
    whether flat parameters were used (not inside DDP)."""
    out = tmp_path / "trainer_ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "benchmarks/bench_trainer.py", "--cpu", "--jobs", "idgen", "--rows-per-item", "8", "--items-per-step", "4",
           "--items", "8", "--steps", "6", "--warmup", "2", "--grad-sync", "auto,ddp,flat", "--grad-sync-dtype",
           "float32,bfloat16", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, check=False, timeout=600, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    rows_of = [(s, c, f, 2, d) for s, c, f in (("flat", "loss", True), ("ddp", "model", False), ("flat", "loss", True))
               for d in ("float32", "bfloat16")]
    assert [(r["grad_sync"], r["compile_scope"], r["flat_params"], r["world_size"], r["grad_sync_dtype"])
            for r in rows] == rows_of
    assert [r["events"] for r in rows] == [[], [], ["flat_params_off"], ["flat_params_off"], [], []]  # off in DDP
    for r in rows:
        assert "error" not in r, r
        assert r["rows_per_step"] == 4 * 8  # per process
        assert r["samples_per_s"] == pytest.approx(2 * r["rows_per_step"] / r["s_per_step"])


def test_bench_trainer_rejects_a_bad_grad_sync() -> None:
    cmd = [sys.executable, "benchmarks/bench_trainer.py", "--cpu", "--grad-sync", "ddp,nccl"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--grad-sync 'ddp,nccl': expected a comma list of auto, ddp, flat" in proc.stderr, proc.stderr

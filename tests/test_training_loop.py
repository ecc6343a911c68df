"""The shared training loop on a toy task: reference equality, resume, kills, SIGTERM, NaN, logging, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from _toy_train import NUM_TIMESTEPS, ToyDataset, ToyTask, make_task, resolved, toy_trainer_cfg
from ofer.training import (
    EXIT_PREEMPTED,
    ConfigMismatchError,
    NonFiniteLossError,
    TrainerConfig,
    TrainingPreempted,
    load_checkpoint,
    train,
)

TOY_SCRIPT = Path(__file__).with_name("_toy_train.py")
VENV_BIN = Path(sys.executable).parent


def _run(task: Any, run_dir: Path, **overrides: Any) -> Any:
    cfg = toy_trainer_cfg(**overrides)
    return train(task, cfg, run_dir=run_dir, device="cpu", resolved_config=resolved(cfg))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in _records(run_dir) if r.get("event") == name]


def _assert_same_state(a: dict, b: dict) -> None:
    torch.testing.assert_close(a["model"], b["model"], atol=1e-6, rtol=0)
    torch.testing.assert_close(a["ema"], b["ema"], atol=1e-6, rtol=0)
    torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"], atol=1e-6, rtol=0)
    assert a["step"] == b["step"] and a["sampler"] == b["sampler"]


def _epoch_order(seed: int, epoch: int, n: int = 64) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 20-step run (seed 0, checkpoint every 5) that other tests compare against."""
    run_dir = tmp_path_factory.mktemp("reference")
    task = make_task(0)
    _run(task, run_dir, max_steps=20, ckpt_every=5)
    return {"ckpt": load_checkpoint(run_dir / "checkpoints" / "last.pt"), "seen": task.seen, "dir": run_dir}


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("lr_scheduler", "linear", "['plateau', 'cosine', 'constant']"),
        ("precision", "fp16", "['fp32', 'bf16']"),
        ("nan_policy", "ignore", "['stop', 'skip']"),
        ("optimizer", "sgd", "['adamw']"),
        ("compile_scope", "graph", "['auto', 'model', 'loss']"),
        ("reduction_launch", "two_rows", "['one_row', 'inductor']"),
        ("grad_sync_dtype", "fp16", "['float32', 'bfloat16']"),
    ],
)
def test_bad_config_values_fail_at_construction(key: str, value: str, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        TrainerConfig.from_mapping(toy_trainer_cfg(**{key: value}))
    assert f"trainer.{key}={value!r}" in str(info.value) and allowed in str(info.value)


def test_unknown_and_missing_config_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown trainer config keys \['lr_schedular'\]"):
        TrainerConfig.from_mapping(toy_trainer_cfg(lr_schedular="cosine"))
    with pytest.raises(ValueError, match=r"missing required keys \['max_steps'\]"):
        TrainerConfig.from_mapping({"batch_size": 8, "max_steps": "???"})
    with pytest.raises(ValueError, match="ema_decay"):
        TrainerConfig.from_mapping(toy_trainer_cfg(ema_decay=1.0))


def test_default_yaml_is_a_valid_trainer_config() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs" / "trainer" / "default.yaml")
    cfg.max_steps, cfg.batch_size = 10, 4  # the yaml leaves them required (???)
    tc = TrainerConfig.from_mapping(cfg)
    assert (tc.weight_decay, tc.ema_decay, tc.plateau_factor, tc.plateau_patience) == (1e-4, 0.999, 0.99, 2)


def test_untrained_parameters_are_an_error(tmp_path: Path) -> None:
    task = make_task(0, hidden=3)
    task.param_groups = lambda: [{"params": list(task.model[0].parameters())}]  # forgets the last layer
    with pytest.raises(ValueError, match=r"trainable parameters \['2.weight', '2.bias'\] are in no param group"):
        _run(task, tmp_path)


# ------------------------------------------------------------------------ independent reference


@pytest.mark.parametrize("flat", [True, False])
def test_loop_equals_a_plain_pytorch_loop(tmp_path: Path, flat: bool) -> None:
    """AdamW + EMA + clipping on the documented batch order, written out by hand, gives the same weights (also
    with trainer.flat_params, AdamW, clipping and EMA over one buffer)."""
    steps, decay, clip = 12, 0.8, 3.0
    task = make_task(5, deterministic_loss=True)
    init = {k: v.clone() for k, v in task.model.state_dict().items()}
    _run(task, tmp_path, max_steps=steps, ckpt_every=None, ema_decay=decay, grad_clip=clip, seed=5, flat_params=flat)
    got = load_checkpoint(tmp_path / "checkpoints" / "last.pt")

    model = nn.Linear(4, 1)
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-4)
    ema = {k: v.clone() for k, v in init.items()}
    data = ToyDataset()
    order = _epoch_order(5, 0) + _epoch_order(5, 1)
    for s in range(steps):
        idx = torch.tensor(order[8 * s : 8 * s + 8])
        pred = model(data.x[idx])[:, 0]
        weight = 1.0 + (idx % NUM_TIMESTEPS).float() / NUM_TIMESTEPS
        loss = (weight * (pred - data.y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        for k, v in model.state_dict().items():
            ema[k] = decay * ema[k] + (1 - decay) * v.detach()
    torch.testing.assert_close(got["model"], model.state_dict(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got["ema"], ema, atol=1e-6, rtol=1e-6)
    assert task.seen == [order[8 * s : 8 * s + 8] for s in range(steps)]


# -------------------------------------------------------------------------------------- resume


def test_resume_equals_uninterrupted_run(tmp_path: Path, reference: dict) -> None:
    first = make_task(0)
    result = _run(first, tmp_path, max_steps=10, ckpt_every=5)
    assert result.step == 10 and result.checkpoint == tmp_path / "checkpoints" / "last.pt"
    second = make_task(123)  # different fresh weights and RNG: all must come from the checkpoint
    result = _run(second, tmp_path, max_steps=20, ckpt_every=5)
    assert result.step == 20
    _assert_same_state(load_checkpoint(result.checkpoint), reference["ckpt"])
    assert first.seen + second.seen == reference["seen"]  # same batches, none re-read
    assert _events(tmp_path, "resume")[0]["step"] == 10
    # the documented order: epoch permutations of (seed, epoch), 8 batches of 8 per epoch
    flat = [i for batch in reference["seen"] for i in batch]
    assert flat == (_epoch_order(0, 0) + _epoch_order(0, 1) + _epoch_order(0, 2))[:160]


def test_resume_with_different_model_config_names_both_values(tmp_path: Path) -> None:
    cfg = toy_trainer_cfg(max_steps=2, ckpt_every=2)
    train(make_task(0, hidden=8), cfg, run_dir=tmp_path, device="cpu", resolved_config=resolved(cfg, hidden=8))
    cfg = toy_trainer_cfg(max_steps=4, ckpt_every=2)
    with pytest.raises(ConfigMismatchError) as info:
        train(make_task(0, hidden=16), cfg, run_dir=tmp_path, device="cpu", resolved_config=resolved(cfg, hidden=16))
    message = str(info.value)
    assert "model.hidden: checkpoint has 8, current config has 16" in message and "last.pt" in message


@pytest.mark.parametrize("first", [False, True])
def test_resume_switching_flat_params_equals_uninterrupted_run(tmp_path: Path, reference: dict, first: bool) -> None:
    """Checkpoints keep AdamW's state per parameter whatever trainer.flat_params: a run resumed with the other
    setting ends as the uninterrupted reference (flat_params=true)."""
    _run(make_task(0), tmp_path, max_steps=10, ckpt_every=5, flat_params=first)
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["optimizer"]
    assert sorted(saved["state"]) == [0, 1] and saved["state"][0]["exp_avg"].shape == (1, 4)  # per parameter
    result = _run(make_task(123), tmp_path, max_steps=20, ckpt_every=5, flat_params=not first)
    _assert_same_state(load_checkpoint(result.checkpoint), reference["ckpt"])
    assert _events(tmp_path, "config_changed_on_resume")


def test_flat_params_with_a_parameter_that_takes_no_part_is_an_error(tmp_path: Path) -> None:
    task = make_task(0)
    task.model.register_parameter("unused", nn.Parameter(torch.zeros(2)))
    with pytest.raises(RuntimeError, match=r"parameter 'unused' got no gradient.*trainer.flat_params=false"):
        _run(task, tmp_path / "flat", max_steps=2)
    task = make_task(0)
    task.model.register_parameter("unused", nn.Parameter(torch.zeros(2)))
    assert _run(task, tmp_path / "per_tensor", max_steps=2, flat_params=False).step == 2


def test_corrupted_last_falls_back_to_previous_and_logs_it(tmp_path: Path, reference: dict) -> None:
    _run(make_task(0), tmp_path, max_steps=10, ckpt_every=5)
    last = tmp_path / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:-200])  # truncated: step 10 is lost, prev.pt (step 5) is good
    result = _run(make_task(0), tmp_path, max_steps=20, ckpt_every=5)
    assert _events(tmp_path, "checkpoint_corrupt")[0]["path"] == str(last)
    fallback = _events(tmp_path, "checkpoint_fallback")[0]
    assert fallback["path"].endswith("prev.pt") and fallback["step"] == 5
    assert _events(tmp_path, "resume")[0]["step"] == 5
    _assert_same_state(load_checkpoint(result.checkpoint), reference["ckpt"])


# ---------------------------------------------------------------------------------- subprocesses


def _toy_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TOY_SCRIPT), "--run-dir", str(run_dir), "--max-steps", "20", "--ckpt-every", "5", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_sigkill_right_after_a_checkpoint_then_resume(tmp_path: Path, reference: dict) -> None:
    proc = subprocess.run(_toy_cmd(tmp_path, "--die-at-step", "10"), env=_env(), capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 10
    result = _run(make_task(0), tmp_path, max_steps=20, ckpt_every=5)
    _assert_same_state(load_checkpoint(result.checkpoint), reference["ckpt"])


def test_sigterm_writes_checkpoint_and_exits_with_preempted_code(tmp_path: Path, reference: dict) -> None:
    proc = subprocess.Popen(_toy_cmd(tmp_path, "--sleep-per-step", "0.2"), env=_env(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        metrics = tmp_path / "metrics.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and any(r.get("step", 0) >= 6 for r in _records(tmp_path)):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err.decode()[-2000:]
    preempted = _events(tmp_path, "preempted")
    assert len(preempted) == 1 and preempted[0]["signal"] == "SIGTERM"
    stopped_at = preempted[0]["step"]
    assert 6 <= stopped_at < 20
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ck["step"] == stopped_at  # finished the step in flight, then checkpointed it
    result = _run(make_task(0), tmp_path, max_steps=20, ckpt_every=5)
    _assert_same_state(load_checkpoint(result.checkpoint), reference["ckpt"])


def test_sigterm_in_process_raises_training_preempted(tmp_path: Path) -> None:
    def on_step_end(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    cfg = toy_trainer_cfg(max_steps=20, ckpt_every=None)
    with pytest.raises(TrainingPreempted) as info:
        train(make_task(0), cfg, run_dir=tmp_path, device="cpu", resolved_config=resolved(cfg), on_step_end=on_step_end)
    assert info.value.code == EXIT_PREEMPTED and info.value.step == 4  # the signal is acted on after step 4
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 4
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers are put back


# ------------------------------------------------------------------------------------------ NaN


def test_every_step_trains_in_training_mode(tmp_path: Path) -> None:
    """The loss sees every module in training mode at every step, also after something between steps put one in
    eval mode (here the step callback, at steps 2 and 4; evaluation restores the mode itself), and the model is
    left in training mode. The loop calls train() only when a module is not in it (train() walks the whole tree
    every step otherwise); checked to fail when the call is dropped."""
    task = make_task(0, hidden=8)
    modes: list[bool] = []
    loss = task.loss

    def recording_loss(model: nn.Module, batch: dict) -> dict[str, Tensor]:
        modes.append(all(m.training for m in model.modules()))
        return loss(model, batch)

    task.loss = recording_loss
    cfg = toy_trainer_cfg(max_steps=6)
    train(task, cfg, run_dir=tmp_path, device="cpu", resolved_config=resolved(cfg),
          on_step_end=lambda step: task.model[2].eval() if step in (2, 4) else None)
    assert modes == [True] * 6
    assert all(m.training for m in task.model.modules())


def test_nan_stop_names_step_and_batch(tmp_path: Path) -> None:
    bad = 17
    order = _epoch_order(0, 0)
    step = order.index(bad) // 8 + 1
    with pytest.raises(NonFiniteLossError) as info:
        _run(ToyTask(nan_at_index=bad), tmp_path, max_steps=8, ckpt_every=1, nan_policy="stop")
    batch = order[(step - 1) * 8 : step * 8]
    assert info.value.step == step and info.value.batch_indices == batch
    message = str(info.value)
    assert f"at step {step}" in message and str(batch) in message and f"non-finite loss on rank 0: [{bad}]" in message
    if step > 1:
        assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == step - 1  # last good one kept
    else:
        assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_nan_skip_skips_the_update_and_counts(tmp_path: Path) -> None:
    bad = 17
    steps = 20
    positions = [e * 8 + _epoch_order(0, e).index(bad) // 8 + 1 for e in range(3)]
    expected_skips = [s for s in positions if s <= steps]
    task = make_task(0, nan_at_index=bad)
    weights: dict[int, Tensor] = {}
    cfg = toy_trainer_cfg(max_steps=steps, nan_policy="skip", max_skips=1)
    result = train(
        task, cfg, run_dir=tmp_path, device="cpu", resolved_config=resolved(cfg),
        on_step_end=lambda s: weights.__setitem__(s, task.model.weight.detach().clone()),
    )
    assert result.skipped == len(expected_skips) and result.step == steps
    assert [r["step"] for r in _events(tmp_path, "nonfinite_skip")] == expected_skips
    for s in expected_skips:
        if s > 1:
            assert torch.equal(weights[s], weights[s - 1])  # no update on a skipped step
    assert all(not torch.equal(weights[s], weights[s - 1]) for s in range(2, steps + 1) if s not in expected_skips)
    assert torch.isfinite(task.model.weight).all()
    assert load_checkpoint(result.checkpoint)["loop"]["skipped_total"] == len(expected_skips)


def test_nan_skip_gives_up_after_max_skips_in_a_row(tmp_path: Path) -> None:
    task = make_task(0)
    task.loss = lambda model, batch: {"loss": model(batch["x"])[:, 0] * float("nan")}
    with pytest.raises(NonFiniteLossError, match="3 steps in a row were non-finite, more than trainer.max_skips=2"):
        _run(task, tmp_path, max_steps=10, nan_policy="skip", max_skips=2)


# ------------------------------------------------------------------------------------- logging


class _EchoTimestepTask(ToyTask):
    """Loss of sample i is its timestep t = i % 8 (plus 0 x prediction): quartile means are known."""

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        self.seen.append(batch["index"].tolist())
        t = batch["index"] % NUM_TIMESTEPS
        return {"loss": t.float() + 0.0 * model(batch["x"])[:, 0], "t": t}


def test_loss_per_timestep_quartile_in_metrics_jsonl(tmp_path: Path) -> None:
    task = _EchoTimestepTask()
    _run(task, tmp_path, max_steps=4, log_every=2)
    logged = [r for r in _records(tmp_path) if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r, window in zip(logged, (task.seen[0:2], task.seen[2:4])):
        ts = [i % NUM_TIMESTEPS for batch in window for i in batch]
        for q in range(4):
            in_q = [t for t in ts if t * 4 // NUM_TIMESTEPS == q]  # quartile q holds t in [2q, 2q + 2)
            if in_q:
                assert r[f"loss_q{q}"] == pytest.approx(sum(in_q) / len(in_q))
            else:
                assert f"loss_q{q}" not in r
        assert r["loss"] == pytest.approx(sum(ts) / len(ts))


def test_plateau_scheduler_reduces_lr_on_flat_loss(tmp_path: Path) -> None:
    task = make_task(0)
    task.loss = lambda model, batch: {"loss": 1.0 + 0.0 * model(batch["x"])[:, 0]}
    _run(task, tmp_path, max_steps=16, lr_scheduler="plateau", plateau_every=2)
    lrs = {r["step"]: r["lr"] for r in _records(tmp_path) if "lr" in r}
    # stepped with the same loss at steps 2, 4, ..., 16; patience 2 -> reduced on calls 4 and 7
    for step, lr in lrs.items():
        calls = step // 2
        reductions = (calls - 1) // 3 if calls else 0
        assert lr == pytest.approx(1e-2 * 0.99**reductions, rel=1e-9), step


def test_cosine_schedule_with_warmup(tmp_path: Path) -> None:
    _run(make_task(0), tmp_path, max_steps=12, lr_scheduler="cosine", warmup_steps=4, min_lr_ratio=0.1)
    lrs = {r["step"]: r["lr"] for r in _records(tmp_path) if "lr" in r}
    for step, lr in lrs.items():
        # the logged lr is the one for the next step, index `step` (0-based)
        if step < 4:
            factor = (step + 1) / 4
        else:
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 4) / 8)))
        assert lr == pytest.approx(1e-2 * factor, rel=1e-9), step


def test_grad_clip_bounds_the_gradient_the_optimizer_sees(tmp_path: Path) -> None:
    task = make_task(0)
    clipped: dict[int, float] = {}
    cfg = toy_trainer_cfg(max_steps=5, grad_clip=0.5)
    train(
        task, cfg, run_dir=tmp_path, device="cpu", resolved_config=resolved(cfg),
        on_step_end=lambda s: clipped.__setitem__(s, float(torch.cat([p.grad.flatten() for p in task.model.parameters()]).norm())),
    )
    raw = {r["step"]: r["grad_norm"] for r in _records(tmp_path) if "grad_norm" in r}
    for s in range(1, 6):
        assert raw[s] > 0.5  # the logged norm is the norm before clipping
        assert clipped[s] == pytest.approx(0.5, rel=1e-4)


def test_wandb_disabled_or_missing_never_breaks_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = toy_trainer_cfg(max_steps=2)
    logger = {"name": "wandb", "project": "ofer-test"}
    train(make_task(0), cfg, run_dir=tmp_path / "a", device="cpu", resolved_config=resolved(cfg), logger_cfg=logger)
    assert any("loss" in r for r in _records(tmp_path / "a"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    train(make_task(0), cfg, run_dir=tmp_path / "b", device="cpu", resolved_config=resolved(cfg), logger_cfg=logger)
    assert any("loss" in r for r in _records(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"logger.name='tensorboard' is not allowed"):
        train(make_task(0), cfg, run_dir=tmp_path / "c", device="cpu", resolved_config=resolved(cfg),
              logger_cfg={"name": "tensorboard"})


def test_bf16_is_ignored_on_cpu(tmp_path: Path) -> None:
    _run(make_task(0), tmp_path, max_steps=1, precision="bf16")
    assert _events(tmp_path, "bf16_ignored_on_cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_cuda(tmp_path: Path) -> None:
    task = make_task(0)
    dtypes: list[torch.dtype] = []
    inner = task.loss

    def loss(model: nn.Module, batch: dict) -> dict[str, Tensor]:
        dtypes.append(model(batch["x"]).dtype)
        return inner(model, batch)

    task.loss = loss
    cfg = toy_trainer_cfg(max_steps=3, precision="bf16")
    result = train(task, cfg, run_dir=tmp_path, device="cuda", resolved_config=resolved(cfg))
    assert set(dtypes) == {torch.bfloat16} and math.isfinite(result.metrics["loss"])
    assert task.model.weight.dtype == torch.float32 and task.model.weight.device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_training_matches_eager_on_cuda(tmp_path: Path) -> None:
    """trainer.compile=true trains the same weights as eager (fp32, same seed and data) and saves the plain
    module's state dict (no `_orig_mod.` prefixes)."""
    weights = {}
    for comp in (False, True):
        task = make_task(0, deterministic_loss=True)
        cfg = toy_trainer_cfg(max_steps=6, compile=comp)
        train(task, cfg, run_dir=tmp_path / str(comp), device="cuda", resolved_config=resolved(cfg))
        weights[comp] = task.model.weight.detach().cpu().clone()
        ckpt = torch.load(tmp_path / str(comp) / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        assert all(not k.startswith("_orig_mod") for k in ckpt["model"])
    torch.testing.assert_close(weights[True], weights[False], atol=1e-5, rtol=1e-5)
    assert not torch.equal(weights[True], make_task(0).model.weight.detach().cpu())  # it did train


# ------------------------------------------------------------------------------------------ DDP


def test_train_frees_its_trainer_before_returning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train() leaves no trainer behind, even with automatic garbage collection off: the trainer sits in reference
    cycles, and under DDP it holds the wrapper whose reducer holds the process group, which must be torn down in
    train() and not at interpreter exit (where gloo's worker threads can abort a finished run with SIGABRT).
    Fails without the collection in train()."""
    import gc
    import weakref

    from ofer.training import loop

    seen = []
    run = loop._Trainer.run
    monkeypatch.setattr(loop._Trainer, "run", lambda self: seen.append(weakref.ref(self)) or run(self))
    enabled = gc.isenabled()
    gc.disable()
    try:
        _run(make_task(0), tmp_path, max_steps=2, ckpt_every=2)
    finally:
        if enabled:
            gc.enable()
    assert len(seen) == 1 and seen[0]() is None


def _toy_two_ranks(run_dir: Path, *extra: str, timeout: int = 300) -> dict[str, Tensor]:
    """The toy script on two ranks under torchrun (12 steps, deterministic loss, checkpoints at 6 and 12, `extra`
    arguments); checks the ranks' final weights are bitwise equal and returns rank 0's (on the CPU)."""
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not found next to the python executable")
    cmd = [
        str(torchrun), "--standalone", "--nproc_per_node=2", str(TOY_SCRIPT), "--run-dir", str(run_dir),
        "--max-steps", "12", "--ckpt-every", "6", "--deterministic-loss", "--dump-final", *extra,
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    rank0 = torch.load(run_dir / "final_rank0.pt", weights_only=True, map_location="cpu")
    rank1 = torch.load(run_dir / "final_rank1.pt", weights_only=True, map_location="cpu")
    torch.testing.assert_close(rank0, rank1, atol=0, rtol=0)
    return rank0


@pytest.mark.slow
def test_ddp_two_gloo_ranks_match_each_other_and_one_process(tmp_path: Path) -> None:
    ddp_dir = tmp_path / "ddp"
    rank0 = _toy_two_ranks(ddp_dir)
    ck = load_checkpoint(ddp_dir / "checkpoints" / "last.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    # the global batch of 8 is split 4 + 4: same gradients as one process on the whole batch
    single = make_task(0, deterministic_loss=True)
    _run(single, tmp_path / "single", max_steps=12, ckpt_every=6)
    torch.testing.assert_close(rank0, single.model.state_dict(), atol=1e-5, rtol=1e-5)
    assert not list(ddp_dir.glob("metrics*.jsonl"))[1:]  # one log file, written by rank 0 only


@pytest.mark.slow
def test_flat_grad_sync_on_two_gloo_ranks_matches_ddp_and_one_process(tmp_path: Path) -> None:
    """trainer.grad_sync=flat (no DDP wrapper, one all-reduce of the flat gradient buffer): the two ranks end
    bitwise equal although each built its model from its own seed (rank 0's weights are broadcast at the start),
    and equal to DDP and to one process on the whole batch (built from rank 0's seed)."""
    finals = {sync: _toy_two_ranks(tmp_path / sync, "--rank-seeded", "--grad-sync", sync) for sync in ("flat", "ddp")}
    assert not torch.equal(make_task(0).model.weight, make_task(1).model.weight)  # the ranks did start apart
    torch.testing.assert_close(finals["flat"], finals["ddp"], atol=1e-6, rtol=1e-6)
    single = make_task(0, deterministic_loss=True)
    _run(single, tmp_path / "single", max_steps=12, ckpt_every=6)
    torch.testing.assert_close(finals["flat"], single.model.state_dict(), atol=1e-5, rtol=1e-5)
    ck = load_checkpoint(tmp_path / "flat" / "checkpoints" / "last.pt")
    assert ck["world_size"] == 2 and ck["step"] == 12
    for sync in ("flat", "ddp"):  # the mode each run used, logged once by rank 0
        assert [(e["mode"], e["world_size"]) for e in _events(tmp_path / sync, "grad_sync")] == [(sync, 2)]
    # DDP keeps the gradients in its buckets: flat buffers (the default trainer.flat_params) are off there, said once
    assert len(_events(tmp_path / "ddp", "flat_params_off")) == 1 and not _events(tmp_path / "flat", "flat_params_off")


@pytest.mark.slow
def test_bf16_grad_sync_on_two_gloo_ranks_matches_ddps_bf16_hook(tmp_path: Path) -> None:
    """trainer.grad_sync_dtype=bfloat16: under grad_sync=flat each flat gradient buffer is summed in bf16, the same
    numbers as DDP with torch's own bf16_compress_hook (which grad_sync=ddp registers); it is not the float32 sync
    (the rounding happened) but stays within what one bf16 rounding of the gradients moves in 12 AdamW steps."""
    runs = {
        name: _toy_two_ranks(tmp_path / name, "--rank-seeded", "--grad-sync", sync, "--grad-sync-dtype", dtype)
        for name, sync, dtype in (("flat_bf16", "flat", "bfloat16"), ("ddp_bf16", "ddp", "bfloat16"),
                                  ("flat_fp32", "flat", "float32"))
    }
    torch.testing.assert_close(runs["flat_bf16"], runs["ddp_bf16"], atol=0, rtol=0)  # the hook's steps, bitwise
    assert any(not torch.equal(runs["flat_bf16"][k], runs["flat_fp32"][k]) for k in runs["flat_fp32"])
    # measured on the CPU: at most 7.5e-5 apart, weights of up to 0.37
    torch.testing.assert_close(runs["flat_bf16"], runs["flat_fp32"], atol=3e-4, rtol=0)
    for name in runs:  # the dtype each run used, logged once by rank 0
        dtype = "float32" if name.endswith("fp32") else "bfloat16"
        assert [e["dtype"] for e in _events(tmp_path / name, "grad_sync")] == [dtype]


def test_flat_grad_sync_averages_the_buffers_and_allows_the_one_process_step(tmp_path: Path) -> None:
    """Under several processes (a real one-rank gloo group standing in for two ranks), grad_sync=flat builds no DDP
    wrapper, compiles the whole loss under compile_scope=auto, allows cuda_graph=true (the all-reduces captured in
    the step's graph; on the CPU ignored), and divides each flat gradient buffer by the world size after the
    all-reduce (one rank: its own gradient over 2)."""
    import torch.distributed as dist

    from ofer.training.distributed import DistContext
    from ofer.training.loop import _Trainer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ctx = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
        cfg = TrainerConfig.from_mapping(toy_trainer_cfg(compile=True, grad_sync="flat"))
        trainer = _Trainer(make_task(0), cfg, tmp_path, ctx, {}, {}, None)
        trainer._build()
        assert trainer.compile_scope == "loss" and trainer.ddp is trainer.model
        assert trainer._loss is not trainer._task_loss  # the whole loss compiled
        cfg = TrainerConfig.from_mapping(toy_trainer_cfg(cuda_graph=True, grad_sync="flat"))
        _Trainer(make_task(0), cfg, tmp_path, ctx, {}, {}, None)._build()  # graphs under flat: allowed

        cfg = TrainerConfig.from_mapping(toy_trainer_cfg(grad_sync="flat"))
        task = make_task(0, deterministic_loss=True)
        trainer = _Trainer(task, cfg, tmp_path, ctx, {}, {}, None)
        trainer._build()
        batch = {"x": torch.randn(4, 4), "y": torch.randn(4), "index": torch.arange(4)}
        trainer._forward_backward(batch, False)
        synced = trainer.flat.grads()[0].clone()
        plain = make_task(0, deterministic_loss=True)
        plain.loss(plain.model, batch)["loss"].float().mean().backward()
        expected = torch.cat([plain.model.weight.grad.flatten(), plain.model.bias.grad.flatten()]) / 2
        spans = trainer.flat.layout[0]
        got = torch.cat([synced[o:o + n] for o, n in spans])
        torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_flat_grad_sync_on_two_gpus_matches_one_process(tmp_path: Path) -> None:
    """grad_sync=flat under NCCL: the two ranks end bitwise equal (each built from its own seed) and equal to one
    process on the whole batch."""
    rank0 = _toy_two_ranks(tmp_path / "flat", "--rank-seeded", "--grad-sync", "flat", "--device", "cuda")
    single = make_task(0, deterministic_loss=True)
    _cuda_run(single, tmp_path / "single", max_steps=12, ckpt_every=6)
    torch.testing.assert_close(rank0, {k: v.cpu() for k, v in single.model.state_dict().items()}, atol=1e-5,
                               rtol=1e-5)


def test_a_failed_capture_on_any_rank_sends_every_rank_back_to_eager_steps(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Under several processes the ranks agree on the capture (their graphs hold matching all-reduces): a rank whose
    own capture failed, or whose capture worked while another rank's failed, drops its graphs with an event; all
    ranks keep them when every capture worked. The capture itself is stubbed (CUDA only); the vote is a real gloo
    all-reduce on a one-rank group standing in for two ranks, the other rank's vote added by hand."""
    import torch.distributed as dist

    from ofer.training import loop
    from ofer.training.distributed import DistContext

    class Captured:
        def __init__(self, trainer: Any, batch: Any) -> None:
            self.batch = batch

    class Fails:
        def __init__(self, trainer: Any, batch: Any) -> None:
            raise RuntimeError("operation not permitted when stream is capturing")

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for stub, other_rank_failed, error in ((Captured, 0.0, None),
                                               (Fails, 0.0, "RuntimeError: operation not permitted"),
                                               (Captured, 1.0, "another rank's capture failed")):
            ctx = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
            vote = ctx.all_reduce_sum
            monkeypatch.setattr(ctx, "all_reduce_sum", lambda x, vote=vote, o=other_rank_failed: vote(x) + o)
            monkeypatch.setattr(loop, "_StepGraphs", stub)
            cfg = TrainerConfig.from_mapping(toy_trainer_cfg(cuda_graph=True))
            trainer = loop._Trainer(make_task(0), cfg, tmp_path, ctx, {}, {}, None)
            trainer._build()
            trainer.use_graphs = True  # as on CUDA
            events = []
            monkeypatch.setattr(trainer, "_event", lambda name, **info: events.append((name, info)))
            trainer._capture({"x": torch.zeros(4, 4)})
            if error is None:
                assert isinstance(trainer._graphs, Captured) and trainer.use_graphs
                assert [n for n, _ in events] == ["cuda_graph_captured"]
            else:
                assert trainer._graphs is None and not trainer.use_graphs
                assert [n for n, _ in events] == ["cuda_graph_failed"] and events[0][1]["error"].startswith(error)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_flat_grad_sync_with_cuda_graphs_on_two_gpus_matches_one_process(tmp_path: Path) -> None:
    """grad_sync=flat with trainer.cuda_graph=true: the all-reduces are captured in the step's graph (NCCL). The
    two ranks end bitwise equal and equal to one process on the whole batch (graphed too); both captured. A hang
    (reported for captured NCCL collectives) fails through the timeout."""
    run_dir = tmp_path / "flat_graph"
    rank0 = _toy_two_ranks(run_dir, "--rank-seeded", "--grad-sync", "flat", "--device", "cuda", "--cuda-graph",
                           timeout=240)
    assert _events(run_dir, "cuda_graph_captured") and not _events(run_dir, "cuda_graph_failed")
    single = make_task(0, deterministic_loss=True, record_seen=False)
    _cuda_run(single, tmp_path / "single", max_steps=12, ckpt_every=6, cuda_graph=True)
    assert _events(tmp_path / "single", "cuda_graph_captured")
    torch.testing.assert_close(rank0, {k: v.cpu() for k, v in single.model.state_dict().items()}, atol=1e-5,
                               rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_bf16_grad_sync_on_two_gpus_with_and_without_graphs_matches_ddps_bf16_hook(tmp_path: Path) -> None:
    """trainer.grad_sync_dtype=bfloat16 under NCCL: flat with its bf16 all-reduces captured in the step's graph, flat
    without graphs, and DDP with torch's bf16_compress_hook train the same weights."""
    runs = {}
    for name, *extra in (("flat_graph", "--grad-sync", "flat", "--cuda-graph"), ("flat", "--grad-sync", "flat"),
                         ("ddp", "--grad-sync", "ddp")):
        runs[name] = _toy_two_ranks(tmp_path / name, "--rank-seeded", "--device", "cuda", "--grad-sync-dtype",
                                    "bfloat16", *extra, timeout=240)
    assert _events(tmp_path / "flat_graph", "cuda_graph_captured")
    torch.testing.assert_close(runs["flat_graph"], runs["flat"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(runs["flat"], runs["ddp"], atol=1e-6, rtol=1e-6)


def test_grad_sync_config_errors() -> None:
    with pytest.raises(ValueError,
                       match=r"trainer.grad_sync='nccl' is not allowed; expected one of \['auto', 'ddp', 'flat'\]"):
        TrainerConfig.from_mapping(toy_trainer_cfg(grad_sync="nccl"))
    with pytest.raises(ValueError, match=r"trainer.grad_sync='flat' all-reduces the flat gradient buffers .* "
                                         r"set trainer.flat_params=true"):
        TrainerConfig.from_mapping(toy_trainer_cfg(grad_sync="flat", flat_params=False))
    with pytest.raises(ValueError, match=r"trainer.ddp_find_unused_parameters=true needs trainer.grad_sync=ddp"):
        TrainerConfig.from_mapping(toy_trainer_cfg(grad_sync="flat", ddp_find_unused_parameters=True))


# ------------------------------------------------------------------------------ CUDA graphs


def test_cuda_graph_is_ignored_on_cpu(tmp_path: Path) -> None:
    """trainer.cuda_graph=true on the CPU: an event, and the same weights as without it."""
    weights = []
    for graph in (False, True):
        task = make_task(0, deterministic_loss=True)
        _run(task, tmp_path / str(graph), max_steps=4, cuda_graph=graph)
        weights.append(task.model.weight.detach().clone())
    assert _events(tmp_path / "True", "cuda_graph_ignored_on_cpu")
    assert not _events(tmp_path / "False", "cuda_graph_ignored_on_cpu")
    torch.testing.assert_close(weights[0], weights[1], atol=0, rtol=0)


def test_cuda_graph_with_ddp_is_a_config_error() -> None:
    """trainer.cuda_graph=true under DDP fails before anything is built, naming the key, the world size and the
    way out (grad_sync=flat captures the all-reduces)."""
    from types import SimpleNamespace

    from ofer.training.loop import _Trainer

    cfg = TrainerConfig.from_mapping(toy_trainer_cfg(cuda_graph=True, grad_sync="ddp"))
    ctx = SimpleNamespace(enabled=True, world_size=2, rank=0, is_main=True, device=torch.device("cpu"))
    trainer = _Trainer(make_task(0), cfg, Path("unused"), ctx, {}, {}, None)
    with pytest.raises(ValueError, match=r"trainer.cuda_graph=true .* this run has 2 processes under DDP\. Set "
                                         r"trainer.grad_sync=flat"):
        trainer._build()


def test_compile_scope_loss_with_ddp_is_a_config_error() -> None:
    """trainer.compile_scope=loss under DDP fails before anything is compiled, naming the key and the world size."""
    from types import SimpleNamespace

    from ofer.training.loop import _Trainer

    cfg = TrainerConfig.from_mapping(toy_trainer_cfg(compile=True, compile_scope="loss", grad_sync="ddp"))
    ctx = SimpleNamespace(enabled=True, world_size=2, rank=0, is_main=True, device=torch.device("cpu"))
    trainer = _Trainer(make_task(0), cfg, Path("unused"), ctx, {}, {}, None)
    with pytest.raises(ValueError, match=r"trainer.compile_scope='loss' .* this run has 2 \(DDP\)"):
        trainer._build()


@pytest.mark.parametrize(("overrides", "mode", "scope"), [
    ({}, "flat", "loss"),  # the defaults: grad_sync=auto with flat params
    ({"flat_params": False}, "ddp", "model"),
    ({"ddp_find_unused_parameters": True}, "ddp", "model"),
    ({"grad_sync": "ddp"}, "ddp", "model"),
])
def test_auto_grad_sync_and_compile_scope_under_several_processes(tmp_path: Path, overrides: dict, mode: str,
                                                                   scope: str) -> None:
    """Under several processes (a real one-rank gloo group standing in for two ranks) the default
    trainer.grad_sync=auto trains without DDP's wrapper where flat gradient buffers exist and no unused parameters
    are searched for (only DDP does that), and wraps the model in DDP otherwise; compile_scope=auto then compiles
    the whole loss, or the model alone inside DDP (where an explicit `loss` is an error)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ofer.training.distributed import DistContext
    from ofer.training.loop import _Trainer

    cfg = TrainerConfig.from_mapping(toy_trainer_cfg(compile=True, **overrides))
    assert cfg.compile_scope == "auto" and cfg.grad_sync == overrides.get("grad_sync", "auto")
    assert (cfg.grad_sync_mode, cfg.compile_scope_for(True), cfg.compile_scope_for(False)) == (mode, scope, "loss")
    # flat buffers in one process as configured; under several processes only without DDP's wrapper
    assert (cfg.flat_params_for(False), cfg.flat_params_for(True)) == (cfg.flat_params, mode == "flat")
    ctx = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))  # one real rank of "two"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        trainer = _Trainer(make_task(0), cfg, tmp_path, ctx, {}, {}, None)
        trainer._build()
        assert trainer.compile_scope == scope
        if mode == "ddp":
            assert isinstance(trainer.ddp, torch._dynamo.eval_frame.OptimizedModule)  # the DDP module, compiled
            assert isinstance(trainer.ddp._orig_mod, DistributedDataParallel)
            assert trainer._loss == trainer._task_loss  # the loss itself is not
            assert trainer.flat is None  # AdamW, clipping, EMA per parameter: DDP's buckets hold the gradients
        else:
            assert trainer.ddp is trainer.model and trainer.sync_flat and trainer.flat is not None
            assert trainer._loss is not trainer._task_loss  # the whole loss compiled
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_loss_trains_like_eager_on_cpu(tmp_path: Path) -> None:
    """trainer.compile_scope=loss compiles the task's whole loss (here the toy task's random t and target noise, an
    MLP and the weighted squared error) and trains the same weights as eager, also when stopped after its step-3
    checkpoint and resumed: the random draws inside the compiled graph are the eager RNG stream's and come back
    with the checkpoint (inductor's own generator would give other numbers, and other weights)."""
    from torch._dynamo.utils import counters

    weights = {}
    for scope in ("eager", "loss", "loss_resumed"):
        torch._dynamo.reset()
        counters.clear()
        task = make_task(0, hidden=8)
        # "loss": the default scope (auto) in one process; "loss_resumed" names it
        compiled = {} if scope == "eager" else {"compile": True} if scope == "loss" else {"compile": True,
                                                                                        "compile_scope": "loss"}
        if scope == "loss_resumed":  # a first run to its step-3 checkpoint; the run below resumes from it
            cfg = toy_trainer_cfg(max_steps=3, ckpt_every=3, **compiled)
            train(make_task(0, hidden=8), cfg, run_dir=tmp_path / scope, device="cpu",
                  resolved_config=resolved(cfg, hidden=8))
        cfg = toy_trainer_cfg(max_steps=6, ckpt_every=3, **compiled)
        res = train(task, cfg, run_dir=tmp_path / scope, device="cpu", resolved_config=resolved(cfg, hidden=8))
        assert res.step == 6
        assert bool(_events(tmp_path / scope, "resume")) == (scope == "loss_resumed")
        weights[scope] = [p.detach().clone() for p in task.model.parameters()]
        if scope != "eager":
            assert counters["stats"]["unique_graphs"] >= 1  # really compiled
            assert [e["scope"] for e in _events(tmp_path / scope, "compile")][-1] == "loss"
    for scope in ("loss", "loss_resumed"):
        for a, b in zip(weights[scope], weights["eager"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=scope)
    start = [p.detach() for p in make_task(0, hidden=8).model.parameters()]
    assert not torch.equal(weights["loss"][0], start[0])  # it did train


def test_trainer_compiles_each_scope_with_its_inductor_options(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.compile_scope=loss compiles the loss with COMPILE_OPTIONS, LOSS_SCOPE_OPTIONS and fallback_random; the
    model scope compiles with COMPILE_OPTIONS only (LOSS_SCOPE_OPTIONS were measured in the loss scope). torch.compile
    is replaced by a recorder that returns the function uncompiled."""
    from ofer.fast_sampling import COMPILE_OPTIONS, LOSS_SCOPE_OPTIONS

    calls = []

    def record(fn, **kwargs):
        calls.append(kwargs.get("options"))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    expected = {"loss": [{**COMPILE_OPTIONS, **LOSS_SCOPE_OPTIONS, "fallback_random": True}],
                "model": [dict(COMPILE_OPTIONS)]}
    for scope, options in expected.items():
        calls.clear()
        cfg = toy_trainer_cfg(max_steps=1, compile=True, compile_scope=scope)
        train(make_task(0, hidden=8), cfg, run_dir=tmp_path / scope, device="cpu",
              resolved_config=resolved(cfg, hidden=8))
        assert calls == options, scope


class _NoisyDataset(ToyDataset):
    """The toy points with noise drawn from the global torch RNG in __getitem__, as a dataset's random image
    sampling does (the MICA datasets' `sampling: random`)."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        return {**item, "x": item["x"] + 0.1 * torch.randn(4)}


class _NoisyTask(ToyTask):
    def train_dataset(self) -> ToyDataset:
        return _NoisyDataset(self.num_items)


class _Crash(Exception):
    pass


def test_resume_is_exact_when_loading_draws_random_numbers(tmp_path: Path) -> None:
    """Loading a batch here draws from the same global RNG as the loss (as the MICA datasets' random image sampling
    does): a run killed after its step-3 checkpoint and resumed equals the uninterrupted run exactly, so the
    checkpoint's RNG states are those the next batch's loading starts from. (A loop that loaded the next batch
    before the checkpoint, as a prefetch would, fails this unless it stores the states of before the loading.)"""
    cfg = toy_trainer_cfg(max_steps=6, ckpt_every=3)

    def run(run_dir: Path, **kwargs: Any) -> ToyTask:
        torch.manual_seed(0)
        task = _NoisyTask(lr=1e-2)  # the same initial weights in every run
        train(task, cfg, run_dir=run_dir, device="cpu", resolved_config=resolved(cfg), **kwargs)
        return task

    whole = run(tmp_path / "whole")

    def crash(step: int) -> None:
        if step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        run(tmp_path / "resumed", on_step_end=crash)
    resumed = run(tmp_path / "resumed")
    assert _events(tmp_path / "resumed", "resume")
    assert resumed.seen == whole.seen[3:]  # the same batches after the resume
    for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_next_batch_loads_while_the_step_runs_but_not_before_a_checkpoint(tmp_path: Path) -> None:
    """In one process the loop loads batch s+1 once step s is launched, before step s's stats are read (the host
    work overlaps the device's), except when a checkpoint, an evaluation or the end follows step s: there the
    loading waits, so the checkpoint's RNG states are those the next batch's loading starts from."""
    order: list[tuple[str, int]] = []

    class Logged(ToyDataset):
        def __getitem__(self, i: int) -> dict[str, Any]:
            order.append(("load", i))
            return super().__getitem__(i)

    task = make_task(0)
    task.train_dataset = lambda: Logged(task.num_items)
    loss = task.loss

    def logged_loss(model: nn.Module, batch: dict) -> dict[str, Tensor]:
        order.append(("loss", int(batch["index"][0])))
        return loss(model, batch)

    task.loss = logged_loss
    cfg = toy_trainer_cfg(max_steps=7, ckpt_every=3, eval_every=5)
    train(task, cfg, run_dir=tmp_path, device="cpu", resolved_config=resolved(cfg),
          on_step_end=lambda s: order.append(("end", s)))
    loads_before_end = {}
    for k, (kind, value) in enumerate(order):
        if kind == "end":
            loads_before_end[value] = sum(1 for e in order[:k] if e[0] == "load")
    # 8 items per batch: when step s ends, its s batches were loaded, and the next one too if it was prefetched
    assert all(loads_before_end[s] in (8 * s, 8 * (s + 1)) for s in range(1, 8)), loads_before_end
    prefetched = [s for s in range(1, 8) if loads_before_end[s] == 8 * (s + 1)]
    assert prefetched == [1, 2, 4], loads_before_end  # not before the checkpoints (steps 3, 6), eval (5) or end (7)
    # ... and each batch was loaded before its loss
    assert [e for e in order if e[0] == "loss"] == [("loss", b[0]) for b in task.seen]


def test_batch_signature_and_float_lrs() -> None:
    from ofer.training.loop import _float_lrs, _signature

    a = {"x": torch.zeros(8, 4), "index": torch.arange(8), "name": "a"}
    assert _signature(a) == _signature({"x": torch.ones(8, 4), "index": torch.arange(8, 16), "name": "a"})
    assert _signature(a) != _signature({"x": torch.ones(7, 4), "index": torch.arange(7), "name": "a"})  # shape
    assert _signature(a) != _signature({"x": torch.ones(8, 4).double(), "index": torch.arange(8), "name": "a"})
    assert _signature(a) == _signature({"x": torch.ones(8, 4), "index": torch.arange(8), "name": "b"})  # by type
    assert _signature(a) != _signature({"x": torch.ones(8, 4), "index": torch.arange(8), "name": 3})
    names = {"x": torch.zeros(2, 4), "actor": ["a", "b"]}
    assert _signature(names) == _signature({"x": torch.ones(2, 4), "actor": ["c", "d"]})
    assert _signature(names) != _signature({"x": torch.ones(2, 4), "actor": ["c"]})
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1e-3)
    opt.param_groups[0]["lr"] = torch.tensor(0.25)
    state = _float_lrs(opt.state_dict())
    assert state["param_groups"][0]["lr"] == 0.25 and type(state["param_groups"][0]["lr"]) is float
    assert isinstance(opt.param_groups[0]["lr"], Tensor)  # the live optimizer is untouched
    assert _float_lrs({"_last_lr": [torch.tensor(0.5), 0.1]})["_last_lr"] == [0.5, 0.1]


def _cuda_run(task: ToyTask, run_dir: Path, **overrides: Any) -> Any:
    cfg = toy_trainer_cfg(**overrides)
    return train(task, cfg, run_dir=run_dir, device="cuda", resolved_config=resolved(cfg))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_training_matches_eager_on_cuda(tmp_path: Path, compile: bool) -> None:
    """trainer.cuda_graph=true trains the same weights, EMA and optimizer state as the eager step (fp32,
    deterministic loss): the batches reach the graph (a different batch every step), the cosine schedule with
    warm-up changes the captured learning rate, clipping and EMA run in the graph; checkpoints hold float lrs. The
    graphed run has trainer.flat_params (fused AdamW, clipping, EMA over one buffer), the eager one not."""
    overrides = dict(max_steps=12, ckpt_every=None, lr_scheduler="cosine", warmup_steps=3, grad_clip=0.5,
                     compile=compile)
    states = {}
    for graph in (False, True):
        task = make_task(0, deterministic_loss=True, record_seen=False)
        _cuda_run(task, tmp_path / str(graph), cuda_graph=graph, flat_params=graph, **overrides)
        states[graph] = load_checkpoint(tmp_path / str(graph) / "checkpoints" / "last.pt")
    assert _events(tmp_path / "True", "cuda_graph_captured") and not _events(tmp_path / "True", "cuda_graph_failed")
    assert not _events(tmp_path / "False", "cuda_graph_captured")
    _assert_same_state(states[True], states[False])
    assert not torch.equal(states[True]["model"]["weight"].cpu(), make_task(0).model.weight.detach())  # trained
    for g in states[True]["optimizer"]["param_groups"]:
        assert type(g["lr"]) is float
    lrs = [r["lr"] for r in _records(tmp_path / "True") if "lr" in r]
    assert len(set(lrs)) > 3  # the schedule moved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_nan_skip_and_resume_on_cuda(tmp_path: Path) -> None:
    """With graphs, a non-finite step is skipped as in the eager step, and a run resumed from a graph run's
    checkpoint (2 eager steps, then a new capture) ends with the same state as an uninterrupted one."""
    bad = 17
    # constant schedule with warm-up: the learning rate depends on the step only, not on max_steps
    overrides = dict(nan_policy="skip", max_skips=1, ckpt_every=5, warmup_steps=4)
    eager = _cuda_run(make_task(0, deterministic_loss=True, nan_at_index=bad, record_seen=False), tmp_path / "eager",
                      max_steps=20, **overrides)
    first = make_task(0, deterministic_loss=True, nan_at_index=bad, record_seen=False)
    _cuda_run(first, tmp_path / "graph", max_steps=10, cuda_graph=True, **overrides)
    second = make_task(7, deterministic_loss=True, nan_at_index=bad, record_seen=False)
    graphed = _cuda_run(second, tmp_path / "graph", max_steps=20, cuda_graph=True, **overrides)
    assert graphed.skipped == eager.skipped >= 2
    assert len(_events(tmp_path / "graph", "cuda_graph_captured")) == 2  # one per process
    _assert_same_state(load_checkpoint(graphed.checkpoint), load_checkpoint(eager.checkpoint))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_failure_falls_back_to_eager_on_cuda(tmp_path: Path) -> None:
    """A loss that syncs with the host (ToyTask records each batch's indices with .tolist()) cannot be captured:
    the run logs why and trains on eagerly, every batch seen once."""
    task = make_task(0, deterministic_loss=True)
    result = _cuda_run(task, tmp_path, max_steps=6, cuda_graph=True)
    failed = _events(tmp_path, "cuda_graph_failed")
    assert len(failed) == 1 and failed[0]["error"]
    assert result.step == 6 and math.isfinite(result.metrics["loss"])
    assert len(task.seen) >= 6 and torch.isfinite(task.model.weight).all()

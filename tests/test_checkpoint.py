"""Checkpoint format, atomic writes, validation, fallback, disk faults, RNG states, EMA, sampler."""

from __future__ import annotations

import builtins
import errno
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ofer.training.checkpoint as ckpt_mod
from _toy_train import ToyTask, make_task, resolved, toy_trainer_cfg
from ofer.training import (
    EMA,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointStore,
    CheckpointWriteError,
    DeterministicBatchSampler,
    load_checkpoint,
    load_model_from_checkpoint,
    save_checkpoint,
    train,
)
from ofer.training.checkpoint import capture_rng_state, content_checksum, restore_rng_state

TOY_SCRIPT = Path(__file__).with_name("_toy_train.py")


def _payload(step: int, value: float = 1.0) -> dict:
    """A minimal valid checkpoint payload."""
    return {
        "task_name": "unit",
        "step": step,
        "model": {"w": torch.full((3, 2), value), "b": torch.arange(4, dtype=torch.int64)},
        "config": {"model": {"width": 3}, "list": [1, 2.5, "x", None, True]},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.999)}]},
    }


# ----------------------------------------------------------------------------------------- format


def test_roundtrip_is_weights_only_loadable_and_checksummed(tmp_path: Path) -> None:
    path = save_checkpoint(_payload(7), tmp_path / "last.pt")
    raw = torch.load(path, weights_only=True)  # plain torch.load works, no custom unpickler needed
    assert raw["format_version"] == ckpt_mod.FORMAT_VERSION
    assert raw["checksum"] == content_checksum(raw)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7
    torch.testing.assert_close(loaded["model"]["w"], torch.full((3, 2), 1.0))
    assert loaded["config"] == {"model": {"width": 3}, "list": [1, 2.5, "x", None, True]}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_checksum_sees_tensor_content_dtype_and_structure() -> None:
    base = content_checksum(_payload(1))
    assert content_checksum(_payload(1)) == base
    assert content_checksum(_payload(1, value=1.0000001)) != base
    other = _payload(1)
    other["model"]["w"] = other["model"]["w"].double()
    assert content_checksum(other) != base
    other = _payload(1)
    other["config"]["list"].append(0)
    assert content_checksum(other) != base
    with pytest.raises(TypeError, match=r"checkpoint\.x: cannot store a \w*Path"):
        content_checksum({"x": Path("/a")})


def test_bit_flip_in_tensor_data_is_detected(tmp_path: Path) -> None:
    path = save_checkpoint(_payload(3, value=0.0), tmp_path / "last.pt")
    data = bytearray(path.read_bytes())
    # torch.save stores the zeros of "w" uncompressed: flip one bit inside them
    at = data.find(bytes(24))
    assert at > 0
    data[at + 5] ^= 0x01
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # torch itself does not notice ...
    with pytest.raises(CheckpointCorruptError, match="fails its checksum"):
        load_checkpoint(path)  # ... the checksum does


def test_truncated_and_foreign_files_are_corrupt(tmp_path: Path) -> None:
    path = save_checkpoint(_payload(3), tmp_path / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointCorruptError, match=str(path)):
        load_checkpoint(path)
    torch.save({"step": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointCorruptError, match="lacks required keys"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    payload = _payload(1)
    payload["format_version"] = ckpt_mod.FORMAT_VERSION + 1
    payload["checksum"] = content_checksum(payload)
    torch.save(payload, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(tmp_path / "new.pt")


# -------------------------------------------------------------------------------------- fallback


def test_store_falls_back_to_previous_good_checkpoint(tmp_path: Path) -> None:
    events: list[tuple[str, dict]] = []
    store = CheckpointStore(tmp_path, keep_every=10, on_event=lambda n, i: events.append((n, i)))
    for step in (5, 10, 15):
        store.save(_payload(step))
    assert {p.name for p in store.dir.iterdir()} == {"last.pt", "prev.pt", "step_000010.pt"}
    assert load_checkpoint(store.prev)["step"] == 10
    path, ck = store.latest_valid()
    assert (path.name, ck["step"]) == ("last.pt", 15)
    assert events == []

    store.last.write_bytes(store.last.read_bytes()[:100])  # truncated last.pt
    path, ck = store.latest_valid()
    assert (path.name, ck["step"]) == ("prev.pt", 10)
    assert [n for n, _ in events] == ["checkpoint_corrupt", "checkpoint_fallback"]
    assert "last.pt" in events[0][1]["path"]

    store.prev.write_bytes(b"garbage")  # prev.pt broken too: the numbered copy remains
    path, ck = store.latest_valid()
    assert (path.name, ck["step"]) == ("step_000010.pt", 10)


def test_crash_between_renames_resumes_from_prev(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_payload(5))
    store.save(_payload(10))
    # state after "last -> prev" but before "tmp -> last": no last.pt, a complete temp file
    os.replace(store.last, store.dir / f".last.pt{ckpt_mod._TMP_MARK}999")
    path, ck = store.latest_valid()
    assert (path.name, ck["step"]) == ("prev.pt", 5)
    assert [p.name for p in store.remove_stale_temp_files()] == [f".last.pt{ckpt_mod._TMP_MARK}999"]


# ------------------------------------------------------------------------------------ disk faults


def test_enospc_raises_clear_error_and_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_payload(5))
    before = store.last.read_bytes()

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as info:
        store.save(_payload(10))
    assert str(store.last) in str(info.value)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert store.last.read_bytes() == before
    assert load_checkpoint(store.last)["step"] == 5
    assert sorted(p.name for p in store.dir.iterdir()) == ["last.pt"]  # temp file removed, no prev rotation


def test_enospc_in_the_numbered_copy_names_it_and_keeps_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path, keep_every=10)

    def full_disk(src: object, dst: object, *args: object, **kwargs: object) -> None:
        Path(dst).write_bytes(b"half")  # the OS wrote a little before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_mod.shutil, "copyfile", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"step_000010\.pt: No space left on device \(the checkpoint needs "
                                                   r"about 0\.0 MB; [\d,]+ MB free there\) \(errno 28\); .*last\.pt "
                                                   r"holds the same step") as info:
        store.save(_payload(10))
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert load_checkpoint(store.last)["step"] == 10
    assert sorted(p.name for p in store.dir.iterdir()) == ["last.pt"]  # the half copy is gone


class _FillingFile:
    """A real file on a disk that fills up after ``room`` bytes: writes past it raise ENOSPC, as the OS does."""

    def __init__(self, f: object, room: int) -> None:
        self._f, self.room = f, room

    def write(self, data: bytes) -> int:
        n = memoryview(data).nbytes
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self._f.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)

    def __enter__(self) -> "_FillingFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


@pytest.mark.parametrize("room", [0, 100, 5_000, 300_000, -50], ids=["header", "first-record", "small-records",
                                                                    "big-record", "end-of-file"])
def test_real_torch_save_on_a_full_disk_reports_enospc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int
) -> None:
    # A full disk inside the real torch.save surfaces from its zip writer as "RuntimeError: unexpected pos 768 vs
    # 662" (seen in CI); the error must still say what the OS said, with the space needed and free.
    store = CheckpointStore(tmp_path)
    store.save(_payload(5))
    before = store.last.read_bytes()
    payload = _payload(10)
    payload["model"]["big"] = torch.zeros(100_000)  # 400 KB, so every room above fails somewhere in the file
    if room < 0:  # this many bytes short of the whole file: the zip's central directory does not fit
        save_checkpoint(payload, tmp_path / "probe.pt")
        room += (tmp_path / "probe.pt").stat().st_size
        (tmp_path / "probe.pt").unlink()

    def filling_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        f = builtins.open(file, mode, *args, **kwargs)
        return _FillingFile(f, room) if "w" in mode else f

    monkeypatch.setattr(ckpt_mod, "open", filling_open, raising=False)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device \(the checkpoint needs about 0\.4 MB; "
                                                   r"[\d,]+ MB free there\) \(errno 28\)") as info:
        store.save(payload)
    assert info.value.errno == errno.ENOSPC
    assert "unexpected pos" not in str(info.value)
    monkeypatch.undo()
    assert store.last.read_bytes() == before
    assert sorted(p.name for p in store.dir.iterdir()) == ["last.pt"]


def test_enospc_during_training_stops_with_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save
    calls = {"n": 0}

    def fails_second_time(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", fails_second_time)
    cfg = toy_trainer_cfg(max_steps=12, ckpt_every=5)
    with pytest.raises(CheckpointWriteError, match="last.pt"):
        train(make_task(0), cfg, run_dir=tmp_path, device="cpu", resolved_config=resolved(cfg))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 5


def test_read_only_directory_raises_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_payload(5))
    if os.geteuid() != 0:
        store.dir.chmod(0o555)
    else:
        # root ignores permission bits: make every open() of this module fail as on a read-only mount
        def read_only_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
            if "w" in mode and str(file).startswith(str(store.dir)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            return builtins.open(file, mode, *args, **kwargs)

        monkeypatch.setattr(ckpt_mod, "open", read_only_open, raising=False)
    try:
        with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*last\.pt") as info:
            store.save(_payload(10))
        assert info.value.errno in (errno.EACCES, errno.EROFS)
    finally:
        store.dir.chmod(0o755)
    assert load_checkpoint(store.last)["step"] == 5


# ------------------------------------------------------------------------- kill during the write


def test_kill_in_the_middle_of_a_checkpoint_write(tmp_path: Path) -> None:
    """SIGKILL while the step-10 checkpoint is half written: the partial temp file is never loaded,
    the run resumes from step 5 and ends with the weights of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", ckpt_mod.PAUSE_ENV: "10:60"}
    cmd = [sys.executable, str(TOY_SCRIPT), "--run-dir", str(tmp_path), "--max-steps", "20", "--ckpt-every", "5"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        tmp_file = None
        for line in proc.stderr:
            if line.startswith(ckpt_mod.PAUSE_MARKER):
                tmp_file = Path(line.split(maxsplit=1)[1].strip())
                break
        assert tmp_file is not None, "the writer never paused"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert tmp_file.exists() and 0 < tmp_file.stat().st_size < (tmp_path / "checkpoints" / "last.pt").stat().st_size
    with pytest.raises(CheckpointCorruptError):
        load_checkpoint(tmp_file)  # really half written
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 5

    cfg = toy_trainer_cfg(max_steps=20, ckpt_every=5)
    result = train(make_task(0), cfg, run_dir=tmp_path, device="cpu", resolved_config=resolved(cfg))
    assert result.step == 20 and not tmp_file.exists()
    ref_dir = tmp_path.parent / (tmp_path.name + "_ref")
    train(make_task(0), cfg, run_dir=ref_dir, device="cpu", resolved_config=resolved(cfg))
    got, ref = load_checkpoint(result.checkpoint), load_checkpoint(ref_dir / "checkpoints" / "last.pt")
    torch.testing.assert_close(got["model"], ref["model"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["ema"], ref["ema"], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------- model loading


def test_load_model_from_checkpoint_returns_ema_by_default(tmp_path: Path) -> None:
    cfg = toy_trainer_cfg(max_steps=6, ckpt_every=3, ema_decay=0.5)
    train(make_task(0, hidden=5), cfg, run_dir=tmp_path, device="cpu", resolved_config=resolved(cfg, hidden=5))
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")

    def build(config: dict) -> nn.Module:
        return ToyTask(hidden=config["model"]["hidden"]).model

    ema_model = load_model_from_checkpoint(tmp_path, build)  # a run dir works as well as a file
    raw_model = load_model_from_checkpoint(tmp_path / "checkpoints" / "last.pt", build, use_ema=False)
    assert not ema_model.training
    torch.testing.assert_close(ema_model.state_dict(), ck["ema"], atol=0, rtol=0)
    torch.testing.assert_close(raw_model.state_dict(), ck["model"], atol=0, rtol=0)
    assert not torch.equal(ck["ema"]["0.weight"], ck["model"]["0.weight"])
    assert ck["task_name"] == "toy" and ck["task_meta"]["num_items"] == 64

    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_model_from_checkpoint(tmp_path, lambda config: ToyTask(hidden=7).model)


def test_load_model_without_ema_needs_explicit_choice(tmp_path: Path) -> None:
    cfg = toy_trainer_cfg(max_steps=2, ckpt_every=2, ema_decay=0.0)
    train(make_task(0), cfg, run_dir=tmp_path, device="cpu", resolved_config=resolved(cfg))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_model_from_checkpoint(tmp_path, lambda c: ToyTask().model)
    assert isinstance(load_model_from_checkpoint(tmp_path, lambda c: ToyTask().model, use_ema=False), nn.Linear)


# ------------------------------------------------------------------------------------- RNG states


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path: Path) -> None:
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    state = capture_rng_state("cpu")
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], random.gauss(0, 1))
    save_checkpoint({**_payload(1), "rng": [state]}, tmp_path / "c.pt")
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"][0], "cpu")
    second = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], random.gauss(0, 1))
    assert torch.equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2:] == second[2:]


# -------------------------------------------------------------------------------------------- EMA


def test_ema_matches_closed_form() -> None:
    model = nn.Linear(2, 1)
    model.bias.requires_grad_(False)  # frozen: copied, not averaged
    p0 = model.weight.detach().clone()
    ema = EMA(model, decay=0.9)
    history = [p0]
    for k in range(1, 4):
        with torch.no_grad():
            model.weight.add_(float(k))
            model.bias.fill_(10.0 * k)
        history.append(model.weight.detach().clone())
        ema.update(model)
    # ema_n = d^n p_0 + sum_{k=1..n} (1 - d) d^(n-k) p_k
    d, n = 0.9, 3
    expected = d**n * history[0] + sum((1 - d) * d ** (n - k) * history[k] for k in range(1, n + 1))
    torch.testing.assert_close(ema.module.weight, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ema.module.bias, torch.tensor([30.0]))
    assert not ema.module.weight.requires_grad


def test_ema_copies_buffers_and_frozen_parameters_as_they_are() -> None:
    """Buffers of every dtype (BatchNorm's float running statistics and int64 batch count) and frozen parameters
    are copied into the averaged module at each update, not averaged; the trainable ones are averaged."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].weight.requires_grad_(False)
    ema = EMA(model, decay=0.5)
    w0 = model[0].weight.detach().clone()
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3))  # moves the running statistics and counts the batches
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].weight.fill_(7.0)
    ema.update(model)
    bn, ema_bn = model[1], ema.module[1]
    assert int(ema_bn.num_batches_tracked) == 3 and ema_bn.num_batches_tracked.dtype == torch.int64
    assert torch.equal(ema_bn.running_mean, bn.running_mean) and torch.equal(ema_bn.running_var, bn.running_var)
    assert torch.equal(ema_bn.weight, torch.full((4,), 7.0))
    torch.testing.assert_close(ema.module[0].weight, w0 + 0.5, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------- sampler


def test_sampler_covers_each_item_once_per_epoch_and_shards_disjointly() -> None:
    n, batch, world = 70, 8, 2
    ranks = [DeterministicBatchSampler(num_items=n, batch_size=batch, seed=3, rank=r, world_size=world) for r in range(world)]
    spe = n // batch
    assert ranks[0].steps_per_epoch == spe
    iters = [iter(s) for s in ranks]
    epoch0 = []
    for b in range(spe):
        parts = [next(it) for it in iters]
        assert all(len(p) == batch // world for p in parts)
        assert parts[0] + parts[1] == ranks[0].global_batch(0, b)
        epoch0 += parts[0] + parts[1]
    assert len(set(epoch0)) == spe * batch  # no repeats; the 6-item tail is dropped
    assert epoch0 == np.random.default_rng([3, 0]).permutation(n)[: spe * batch].tolist()
    first_of_epoch1 = next(iters[0]) + next(iters[1])
    assert first_of_epoch1 == np.random.default_rng([3, 1]).permutation(n)[:batch].tolist()


def test_sampler_resumes_at_position_without_replaying() -> None:
    full = DeterministicBatchSampler(num_items=64, batch_size=8, seed=0)
    it = iter(full)
    stream = [next(it) for _ in range(20)]
    resumed = iter(DeterministicBatchSampler(num_items=64, batch_size=8, seed=0, epoch=1, batch_in_epoch=3))
    assert [next(resumed) for _ in range(9)] == stream[11:20]


def test_sampler_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        DeterministicBatchSampler(num_items=64, batch_size=8, seed=0, world_size=3)
    with pytest.raises(ValueError, match="fewer than trainer.batch_size=8"):
        DeterministicBatchSampler(num_items=5, batch_size=8, seed=0)

"""Self-describing, atomically written, validated checkpoints.

File format (``format_version`` 1): one ``torch.save`` dict that ``torch.load(weights_only=True)``
reads (only tensors and plain containers inside) with the keys

* ``format_version`` (int), ``checksum`` (sha256 hex of everything else, see :func:`content_checksum`),
* ``task_name`` (str), ``task_meta`` (the task's ``describe()`` or {}),
* ``step`` (optimizer steps done, skipped updates included), ``sampler`` (position: epoch,
  batch_in_epoch, num_items, batch_size, seed), ``loop`` (skip counters, plateau window),
* ``model`` and ``ema`` (``state_dict`` of the bare module; ``ema`` is None when EMA is off),
  ``optimizer``, ``scheduler``,
* ``rng`` (a list with one dict per DDP rank: torch / numpy / python / cuda generator states as
  tensors), ``world_size``,
* ``config`` (the resolved run config as plain dicts/lists/scalars), ``trainer`` (the trainer
  config), ``versions`` (torch, numpy, python).

Writing: temp file in the same directory -> fsync -> the old ``last.pt`` becomes ``prev.pt`` ->
``os.replace`` -> fsync of the directory. A crash at any point leaves either the new file or the
previous good one; temp files are never loaded. Reading: a file that fails to unpickle, lacks a
required key or fails its checksum is corrupt; :class:`CheckpointStore` then falls back to
``prev.pt`` or the newest numbered ``step_XXXXXX.pt`` and reports the event.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "checksum", "task_name", "step", "model", "config")
LAST_NAME = "last.pt"
PREV_NAME = "prev.pt"
_NUMBERED = re.compile(r"^step_(\d+)\.pt$")
_TMP_MARK = ".tmp-"

# Test hook (used by tests/test_checkpoint.py to kill a process in the middle of a write):
# "STEP:SECONDS" makes the writer of the checkpoint for step STEP flush part of the temp file,
# print a marker line to stderr and sleep. Unset in normal use.
PAUSE_ENV = "OFER_TEST_CHECKPOINT_PAUSE"
PAUSE_MARKER = "OFER_TEST_CHECKPOINT_PAUSED"


class CheckpointError(RuntimeError):
    """Base class for checkpoint problems."""


class CheckpointCorruptError(CheckpointError):
    """The file is truncated, not a checkpoint, lacks required keys or fails its checksum."""


class CheckpointWriteError(CheckpointError):
    """Writing failed (disk full, read-only directory ...); the previous checkpoint is untouched."""

    def __init__(self, message: str, *, path: Path, errno: int | None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class ConfigMismatchError(CheckpointError):
    """The run config differs from the checkpoint's in model-defining keys."""


# --------------------------------------------------------------------------------------------------
# plain containers and checksum


def to_plain(obj: Any, where: str = "config") -> Any:
    """Copy ``obj`` into dicts/lists/str/int/float/bool/None (OmegaConf containers are resolved).

    Raises TypeError naming the key path of the first value of another type, because such values
    would make ``torch.load(weights_only=True)`` fail later.
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, (bool, int, float, str)):  # subclasses (enums, TorchVersion) -> base type
        return bool(obj) if isinstance(obj, bool) else int(obj) if isinstance(obj, int) else (
            float(obj) if isinstance(obj, float) else str(obj)
        )
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be a str or int, got {type(k).__name__}")
            out[k] = to_plain(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"{where}: value {obj!r} of type {type(obj).__name__} is not a plain dict/list/str/number/bool/None"
    )


def _hash_into(h: Any, obj: Any, where: str) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    elif isinstance(obj, Mapping):
        keys = sorted(obj, key=lambda k: (type(k).__name__, repr(k)))
        h.update(f"D{len(keys)}|".encode())
        for k in keys:
            h.update(f"{type(k).__name__}:{k!r}|".encode())
            _hash_into(h, obj[k], f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        # lists and tuples hash alike: the unpickler may return either
        h.update(f"L{len(obj)}|".encode())
        for i, v in enumerate(obj):
            _hash_into(h, v, f"{where}[{i}]")
    elif type(obj) in (type(None), bool, int, float, str):
        # exact types only: a subclass (e.g. torch's TorchVersion str) would not load with weights_only
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())
    else:
        raise TypeError(f"checkpoint{where}: cannot store a {type(obj).__name__}; use tensors and plain containers")


def content_checksum(payload: Mapping[str, Any]) -> str:
    """sha256 over a canonical walk of ``payload`` without its ``checksum`` key (tensor bytes included)."""
    h = hashlib.sha256()
    _hash_into(h, {k: v for k, v in payload.items() if k != "checksum"}, "")
    return h.hexdigest()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------------
# random number generator states


def capture_rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """torch (CPU), CUDA (``device``'s generator, if CUDA), numpy and python states as tensors."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    device = torch.device(device) if device is not None else None
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }


def restore_rng_state(state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    device = torch.device(device) if device is not None else None
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))


# --------------------------------------------------------------------------------------------------
# writing


class _Writer:
    """The file ``torch.save`` writes through: keeps the first OS error of a write, and serves the
    :data:`PAUSE_ENV` test hook (flush, announce and sleep after the first write) when ``pause`` is set.

    ``torch.save`` does not pass a failed write's ``OSError`` on: its zip writer counts the write as short and
    fails later with ``RuntimeError: ... unexpected pos 768 vs 662``. Keeping the error lets
    :func:`save_checkpoint` report what the OS said (``No space left on device``, errno 28).
    """

    def __init__(self, f: Any, path: Path, pause: float | None) -> None:
        self._f, self._path, self._pause = f, path, pause
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            n = self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        if self._pause is not None and n:
            seconds, self._pause = self._pause, None
            self._f.flush()
            os.fsync(self._f.fileno())
            print(f"{PAUSE_MARKER} {self._path}", file=sys.stderr, flush=True)
            time.sleep(seconds)
        return n

    def flush(self) -> None:
        self._f.flush()


def _pause_seconds(step: Any) -> float | None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return None
    try:
        at, seconds = spec.split(":")
        return float(seconds) if int(at) == step else None
    except ValueError as e:
        raise ValueError(f"{PAUSE_ENV}={spec!r}: expected 'STEP:SECONDS'") from e


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # fsync on a directory is unsupported on some filesystems; durability is best effort there
    finally:
        os.close(fd)


def _tensor_bytes(data: Any) -> int:
    """The bytes of every tensor in a nested dict/list payload: about the size ``torch.save`` writes."""
    need, stack = 0, [data]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            need += item.numel() * item.element_size()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return need


def _write_failure(e: OSError, directory: Path, need: Callable[[], int]) -> str:
    """What the OS said of a failed write, e.g. ``"No space left on device (the checkpoint needs about 199.5 MB;
    12 MB free there)"``: the space note for errors that can mean a full disk (``need()``: the bytes to write),
    when the disk can be asked."""
    reason = e.strerror or str(e)
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
        return reason
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return reason
    return f"{reason} (the checkpoint needs about {need() / 1e6:,.1f} MB; {free / 1e6:,.0f} MB free there)"


def save_checkpoint(payload: Mapping[str, Any], path: str | Path, *, previous: str | Path | None = None) -> Path:
    """Write ``payload`` (plus ``format_version`` and ``checksum``) to ``path`` atomically.

    When ``previous`` is given and ``path`` exists, the old file is renamed to ``previous`` just
    before the new one takes its place. Raises :class:`CheckpointWriteError` naming the path on any
    OS-level failure; ``path`` (or ``previous``) then still holds the last good checkpoint.
    """
    path = Path(path)
    directory = path.parent
    data = _to_cpu(dict(payload))
    data["format_version"] = FORMAT_VERSION
    data["checksum"] = content_checksum(data)
    tmp = directory / f".{path.name}{_TMP_MARK}{os.getpid()}"
    pause = _pause_seconds(data.get("step"))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            writer = _Writer(f, tmp, pause)
            try:
                torch.save(data, writer)
            except RuntimeError as e:
                # the C++ zip writer reports a failed write (e.g. ENOSPC) as a RuntimeError; the OS's error is kept
                raise writer.error or OSError(errno.EIO, f"torch.save failed: {e}") from e
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
        _fsync_dir(directory)
    except OSError as e:
        with contextlib.suppress(OSError):  # the directory may be unwritable; temp files are never loaded
            tmp.unlink(missing_ok=True)
        reason = _write_failure(e, directory, lambda: _tensor_bytes(data))
        raise CheckpointWriteError(
            f"could not write checkpoint {path}: {reason} (errno {e.errno}); "
            f"the previous checkpoint in {directory} is left as it was",
            path=path,
            errno=e.errno,
        ) from e
    return path


# --------------------------------------------------------------------------------------------------
# reading


def load_checkpoint(path: str | Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint with ``torch.load(weights_only=True)``.

    Tensors are moved to ``map_location`` after the checksum is verified (RNG states stay on CPU).
    Raises FileNotFoundError, :class:`CheckpointCorruptError` (unreadable, missing keys, checksum
    mismatch) or :class:`CheckpointError` (written by a newer format version).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler fails in many ways on a damaged file; all mean "corrupt"
        raise CheckpointCorruptError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise CheckpointCorruptError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointCorruptError(f"checkpoint {path} lacks required keys {missing}")
    if not isinstance(data["format_version"], int) or data["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {data['format_version']!r}; this code reads <= {FORMAT_VERSION}"
        )
    actual = content_checksum(data)
    if actual != data["checksum"]:
        raise CheckpointCorruptError(
            f"checkpoint {path} fails its checksum (stored {data['checksum'][:16]}..., content {actual[:16]}...)"
        )
    if torch.device(map_location).type != "cpu":
        rng = data.pop("rng", None)
        data = _to_device(data, map_location)
        if rng is not None:
            data["rng"] = rng
    return data


def model_state_from_checkpoint(ckpt: Mapping[str, Any], *, use_ema: bool = True) -> dict[str, Tensor]:
    """The EMA weights (default) or the raw trained weights of a loaded checkpoint."""
    if use_ema:
        if ckpt.get("ema") is None:
            raise CheckpointError(
                f"checkpoint of task {ckpt.get('task_name')!r} at step {ckpt.get('step')} has no EMA weights "
                "(trained with trainer.ema_decay=0); pass use_ema=False to use the raw weights"
            )
        return ckpt["ema"]
    return ckpt["model"]


def resolve_checkpoint_path(path_or_run_dir: str | Path) -> Path:
    """A checkpoint file as given, or for a run directory its newest valid checkpoint (with fallback)."""
    p = Path(path_or_run_dir)
    if p.is_dir():
        found = CheckpointStore(p).latest_valid()
        if found is None:
            raise FileNotFoundError(f"no valid checkpoint under {p / 'checkpoints'}")
        return found[0]
    return p


def load_model_from_checkpoint(
    path_or_run_dir: str | Path,
    build_model: Callable[[dict[str, Any]], nn.Module],
    *,
    use_ema: bool = True,
    map_location: torch.device | str = "cpu",
) -> nn.Module:
    """Rebuild a trained network from a checkpoint alone.

    ``build_model(config)`` receives the resolved run config stored in the checkpoint and returns
    an untrained module of the right architecture; the EMA weights (default) or the raw weights are
    loaded into it with ``strict=True``. Returned on ``map_location`` in eval mode.
    """
    path = resolve_checkpoint_path(path_or_run_dir)
    ckpt = load_checkpoint(path, map_location="cpu")
    model = build_model(ckpt["config"])
    try:
        model.load_state_dict(model_state_from_checkpoint(ckpt, use_ema=use_ema), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model built from its config: {e}") from e
    return model.to(map_location).eval()


# --------------------------------------------------------------------------------------------------
# config comparison on resume


_MISSING = "<missing>"


def _lookup(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split(".") if dotted else []:
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _diff(a: Any, b: Any, where: str, out: list[tuple[str, Any, Any]]) -> None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            _diff(a.get(k, _MISSING), b.get(k, _MISSING), f"{where}.{k}" if where else str(k), out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append((where, a, b))


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    """Human-readable differences of ``saved`` vs ``current`` below each dotted key in ``keys``
    (``""`` = the whole config)."""
    out: list[tuple[str, Any, Any]] = []
    for key in keys:
        _diff(_lookup(saved, key), _lookup(current, key), key, out)
    return [f"{k}: checkpoint has {a!r}, current config has {b!r}" for k, a, b in out]


# --------------------------------------------------------------------------------------------------
# the checkpoints of one run


class CheckpointStore:
    """``<run_dir>/checkpoints/{last,prev,step_XXXXXX}.pt`` with fallback on corruption.

    ``on_event(name, info)`` is told about fallbacks and removed temp files (the loop logs them).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        keep_every: int | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.last = self.dir / LAST_NAME
        self.prev = self.dir / PREV_NAME
        self.keep_every = keep_every
        self._on_event = on_event or (lambda name, info: None)

    def numbered(self, step: int) -> Path:
        return self.dir / f"step_{step:06d}.pt"

    def save(self, payload: Mapping[str, Any]) -> Path:
        """Write ``last.pt`` (old one -> ``prev.pt``) and, every ``keep_every`` steps, a numbered copy."""
        save_checkpoint(payload, self.last, previous=self.prev)
        step = int(payload["step"])
        if self.keep_every and step % self.keep_every == 0:
            target = self.numbered(step)
            tmp = self.dir / f".{target.name}{_TMP_MARK}{os.getpid()}"
            try:
                # a real copy, not a hard link: it must survive damage to last.pt / prev.pt's data
                shutil.copyfile(self.last, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except OSError as e:
                with contextlib.suppress(OSError):  # cleanup only; the error below is what matters
                    tmp.unlink(missing_ok=True)
                reason = _write_failure(e, self.dir, lambda: self.last.stat().st_size if self.last.is_file() else 0)
                raise CheckpointWriteError(
                    f"could not write checkpoint {target}: {reason} (errno {e.errno}); {self.last} holds the same "
                    f"step", path=target, errno=e.errno
                ) from e
        return self.last

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete temp files left by a killed writer (they are never loaded); returns them."""
        if not self.dir.is_dir():
            return []
        stale = sorted(p for p in self.dir.iterdir() if p.name.startswith(".") and _TMP_MARK in p.name)
        for p in stale:
            p.unlink(missing_ok=True)
            self._on_event("checkpoint_temp_removed", {"path": str(p)})
        return stale

    def _candidates(self) -> list[Path]:
        numbered = []
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                m = _NUMBERED.match(p.name)
                if m:
                    numbered.append((int(m.group(1)), p))
        return [self.last, self.prev] + [p for _, p in sorted(numbered, reverse=True)]

    def latest_valid(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads and validates, or None if there is none at all.

        ``last.pt`` wins when valid; otherwise the valid fallback with the highest step is used and
        each rejected file is reported through ``on_event("checkpoint_corrupt", ...)``.
        """
        best: tuple[Path, dict[str, Any]] | None = None
        for p in self._candidates():
            if not p.exists():
                continue
            m = _NUMBERED.match(p.name)
            if best is not None and m and int(m.group(1)) <= best[1]["step"]:
                break  # numbered files come newest first; none can beat what we have
            try:
                ckpt = load_checkpoint(p)
            except CheckpointCorruptError as e:
                self._on_event("checkpoint_corrupt", {"path": str(p), "error": str(e)})
                continue
            if p == self.last:
                return p, ckpt
            if best is None or ckpt["step"] > best[1]["step"]:
                best = (p, ckpt)
        if best is not None:
            self._on_event("checkpoint_fallback", {"path": str(best[0]), "step": int(best[1]["step"])})
        return best


def software_versions() -> dict[str, str]:
    """Versions stored in checkpoints for later forensics."""
    return {
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
        "cuda": str(torch.version.cuda),
    }

"""Metric loggers: a JSON-lines file on rank 0 always, plus Weights & Biases when asked.

``configs/logger/none.yaml`` -> only ``<run_dir>/metrics.jsonl``; ``configs/logger/wandb.yaml`` ->
also wandb, which respects ``WANDB_MODE`` (disabled / offline) and never stops training: when
wandb is missing or fails, a warning is logged and the run continues with the file alone.

Each line of ``metrics.jsonl`` is ``{"step": s, ...metrics}`` or, for events (resume, checkpoint
fallback, skipped step, preemption ...), ``{"step": s, "event": name, ...info}``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("ofer.training")

LOGGER_NAMES = ("none", "wandb")
_WANDB_KEYS = {"name", "project", "entity", "group", "tags", "mode", "run_name"}


class MetricsLogger(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def event(self, step: int, name: str, info: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class NullLogger:
    """Logger of ranks other than 0."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def event(self, step: int, name: str, info: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends one JSON object per line to ``path`` and flushes it (a killed run keeps its log)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def _write(self, record: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(_json_safe(dict(record)), sort_keys=False) + "\n")
        self._f.flush()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._write({"step": step, "time": round(time.time(), 3), **metrics})

    def event(self, step: int, name: str, info: Mapping[str, Any]) -> None:
        self._write({"step": step, "event": name, "time": round(time.time(), 3), **info})

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class WandbLogger:
    """Weights & Biases run that resumes the same wandb id across restarts of one run dir."""

    def __init__(
        self,
        *,
        run_dir: Path,
        config: Mapping[str, Any],
        project: str = "ofer",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
        run_name: str | None = None,
    ) -> None:
        self.run: Any = None
        try:
            import wandb
        except ImportError as e:
            log.warning("wandb logging requested but wandb cannot be imported (%s); logging to metrics.jsonl only", e)
            return
        id_file = run_dir / "wandb_id.txt"
        try:
            run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
            id_file.write_text(run_id + "\n")
            kwargs: dict[str, Any] = dict(
                project=project,
                entity=entity,
                group=group,
                tags=list(tags or []),
                name=run_name,
                dir=str(run_dir),
                id=run_id,
                resume="allow",
                config=dict(config),
            )
            if mode is not None:  # otherwise wandb reads WANDB_MODE itself
                kwargs["mode"] = mode
            self.run = wandb.init(**kwargs)
        except Exception as e:  # wandb offline / misconfigured must not stop training
            log.warning("wandb.init failed (%s: %s); logging to metrics.jsonl only", type(e).__name__, e)
            self.run = None

    def _call(self, what: str, fn: Any) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:  # a network hiccup must not stop training
            log.warning("wandb %s failed (%s: %s); wandb disabled for the rest of the run", what, type(e).__name__, e)
            self.run = None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._call("log", lambda: self.run.log(dict(metrics), step=step))

    def event(self, step: int, name: str, info: Mapping[str, Any]) -> None:
        self._call("log", lambda: self.run.log({f"event/{name}": 1}, step=step))

    def close(self) -> None:
        self._call("finish", lambda: self.run.finish())
        self.run = None


class MultiLogger:
    def __init__(self, *loggers: Any) -> None:
        self.loggers = list(loggers)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for lg in self.loggers:
            lg.log(step, metrics)

    def event(self, step: int, name: str, info: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.event(step, name, info)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def check_logger_cfg(logger_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a ``logger`` config group (None = "none"); returns it as a plain dict."""
    if logger_cfg is None:
        return {"name": "none"}
    cfg = dict(logger_cfg)
    name = cfg.get("name", "none")
    if name not in LOGGER_NAMES:
        raise ValueError(f"logger.name={name!r} is not allowed; expected one of {list(LOGGER_NAMES)}")
    allowed = {"name"} if name == "none" else _WANDB_KEYS
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"unknown logger config keys {unknown} for logger {name!r}; allowed: {sorted(allowed)}")
    return cfg


def build_logger(
    logger_cfg: Mapping[str, Any] | None, *, run_dir: Path, config: Mapping[str, Any], is_main: bool
) -> MetricsLogger:
    """The logger of this rank: rank 0 writes ``<run_dir>/metrics.jsonl`` (+ wandb), others nothing."""
    cfg = check_logger_cfg(logger_cfg)
    if not is_main:
        return NullLogger()
    jsonl = JsonlLogger(run_dir / "metrics.jsonl")
    if cfg["name"] == "wandb":
        kwargs = {k: v for k, v in cfg.items() if k != "name"}
        return MultiLogger(jsonl, WandbLogger(run_dir=run_dir, config=config, **kwargs))
    return jsonl

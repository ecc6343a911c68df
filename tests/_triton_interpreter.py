"""Run a test script under Triton's CPU interpreter (kernels without a GPU, here and in CI).

A subprocess, because TRITON_INTERPRET must be set before Triton is imported."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: str, *, timeout: float = 600) -> None:
    """Run `script` (Python source that prints "ok" last) with TRITON_INTERPRET=1 from the repository root; fail
    with its stderr unless it exits 0 and prints "ok"."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]

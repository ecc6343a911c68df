"""benchmarks/model_flops.py: the FLOPs that torch's FlopCounterMode counts in one forward of each configured
denoiser, against closed forms from the model's configuration (the attention's activation products) and from its
parameters (every weight matrix multiplied once per row), and its error for an unknown job."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ofer.models.unet1d import Denoiser

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import model_flops as mf  # noqa: E402


@pytest.mark.parametrize("job", ["idgen", "expgen"])
def test_counted_flops_match_the_closed_forms(job: str) -> None:
    cfg = mf.model_config(job)
    row = mf.count(job, rows=3)
    heads, dh, tokens = cfg["attn_heads"], cfg["attn_head_dim"], cfg["attn_tokens"]
    blocks = 2 * (len(cfg["widths"]) - 1) + 2  # one per down level, the middle, one per up level, the final one
    # per block and row: scores q k^T and the weighted values (2 x H T^2 Dh multiply-adds), then the token mix
    # (H T Dh multiply-adds)
    attention = blocks * (2 * 2 * heads * tokens**2 * dh + 2 * heads * tokens * dh)
    assert row["forward_activation_matmuls"] == attention
    # every weight matrix (2-D) is multiplied once per row in a parameter matmul; the 1-D parameters (biases, norm
    # gains) and the token mix (inside the activation product above) are not
    model = Denoiser(**cfg)
    other = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1 or n.endswith("token_mix.weight"))
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["forward_param_matmuls"] == 2 * (row["params"] - other)
    assert row["with_attention"] == 6 * row["params"] + 3 * attention
    assert row["ratio"] == pytest.approx(1 + attention / (2 * row["params"]))


def test_paper_sizes_give_the_documented_ratios() -> None:
    # BENCHMARKS.md converts the measured MFU with these ratios (6 blocks of 4 heads x 16 tokens x 32 channels)
    ratios = {job: mf.count(job, rows=2)["ratio"] for job in mf.JOBS}
    assert ratios["idgen"] == pytest.approx(1.0326, abs=1e-4)
    assert ratios["expgen"] == pytest.approx(1.1283, abs=1e-4)


def test_unknown_job_is_an_error() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/model_flops.py", "--jobs", "idgen,idrnk"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--jobs 'idgen,idrnk'" in proc.stderr and "idgen, expgen" in proc.stderr

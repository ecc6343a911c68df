"""`OferPipeline.forward(stage_seconds=...)`: the per-stage timing used by benchmarks/bench_pipeline.py records
every stage and leaves the hypotheses unchanged."""
from __future__ import annotations

import torch

from ofer.diffusion import GaussianDiffusion
from ofer.models.ranker import IdRanker
from ofer.models.unet1d import Denoiser
from ofer.pipeline import OferPipeline


def test_stage_seconds_records_every_stage_and_changes_nothing(flame) -> None:
    torch.manual_seed(0)
    pipe = OferPipeline(
        flame=flame, idgen=Denoiser(dim=300, cond_dim=512, widths=(16, 8), attention=False).eval(),
        id_diffusion=GaussianDiffusion(num_steps=20),
        expgen=Denoiser(dim=53, cond_dim=1024, widths=(8, 4), attention=False).eval(),
        exp_diffusion=GaussianDiffusion(num_steps=20),
        ranker=IdRanker(num_face_vertices=len(flame.face_mask("face")), widths=(32, 16)).eval(),
        id_sampling={"sampler": "ddim", "steps": 3}, exp_sampling={"sampler": "ddim", "steps": 3}, num_samples=4)
    arc, farl = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1), torch.randn(2, 512)
    plain = pipe(arc, farl, generator=torch.Generator().manual_seed(1))
    stages: dict[str, float] = {}
    timed = pipe(arc, farl, generator=torch.Generator().manual_seed(1), stage_seconds=stages)
    assert list(stages) == ["idgen", "decode", "idrank", "expgen"] and all(v >= 0 for v in stages.values())
    for name in ("shapes", "scores", "best", "expressions", "jaw"):
        torch.testing.assert_close(getattr(timed, name), getattr(plain, name), rtol=0, atol=0)

"""`OferPipeline.forward(stage_seconds=...)`: the per-stage timing used by benchmarks/bench_pipeline.py records
every stage and leaves the hypotheses unchanged; IdRank from the shape coefficients (`fold_ranker`, the default)
ranks as decoding every candidate and scoring its vertices does."""
from __future__ import annotations

import pytest
import torch

import ofer.pipeline
from ofer.diffusion import GaussianDiffusion
from ofer.models.ranker import IdRanker, candidate_vertices
from ofer.models.unet1d import Denoiser
from ofer.pipeline import OferPipeline


def _pipeline(flame, *, ranker: IdRanker | None = None, **kw) -> OferPipeline:
    torch.manual_seed(0)
    return OferPipeline(
        flame=flame, idgen=Denoiser(dim=300, cond_dim=512, widths=(16, 8), attention=False).eval(),
        id_diffusion=GaussianDiffusion(num_steps=20),
        expgen=Denoiser(dim=53, cond_dim=1024, widths=(8, 4), attention=False).eval(),
        exp_diffusion=GaussianDiffusion(num_steps=20),
        ranker=(ranker or IdRanker(num_face_vertices=len(flame.face_mask("face")), widths=(32, 16))).eval(),
        id_sampling={"sampler": "ddim", "steps": 3}, exp_sampling={"sampler": "ddim", "steps": 3}, num_samples=4,
        **kw)


@pytest.mark.parametrize("fold_ranker", [True, False])
def test_stage_seconds_records_every_stage_and_changes_nothing(flame, fold_ranker) -> None:
    pipe = _pipeline(flame, fold_ranker=fold_ranker)
    assert pipe.fold_ranker is fold_ranker
    arc, farl = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1), torch.randn(2, 512)
    plain = pipe(arc, farl, generator=torch.Generator().manual_seed(1))
    stages: dict[str, float] = {}
    timed = pipe(arc, farl, generator=torch.Generator().manual_seed(1), stage_seconds=stages)
    assert list(stages) == ["idgen", "decode", "idrank", "expgen"] and all(v >= 0 for v in stages.values())
    for name in ("shapes", "scores", "best", "expressions", "jaw"):
        torch.testing.assert_close(getattr(timed, name), getattr(plain, name), rtol=0, atol=0)


def test_folded_ranker_scores_like_decoded_candidates(flame, monkeypatch) -> None:
    """Same seed, fold on (default) and off: the same shapes, the same scores up to float32 rounding, the same
    ranked shape; and the folded path decodes nothing."""
    face_idx = flame.face_mask("face")
    torch.manual_seed(1)
    # input_norm fitted on random candidates, so the logits of one image are well apart (see ranker.py's notes)
    ranker = IdRanker(num_face_vertices=len(face_idx), widths=(32, 16), input_norm=True)
    ranker.fit_input_normalization(candidate_vertices(flame, torch.randn(8, 4, 300), face_idx))
    pipe = _pipeline(flame, ranker=ranker)
    B = 6
    arc, farl = torch.nn.functional.normalize(torch.randn(B, 512), dim=-1), torch.randn(B, 512)

    def no_decode(*args, **kwargs):
        raise AssertionError("the folded ranker must not decode the candidates")

    monkeypatch.setattr(ofer.pipeline, "candidate_vertices", no_decode)
    assert pipe.fold_ranker
    folded = pipe(arc, farl, generator=torch.Generator().manual_seed(2))
    monkeypatch.undo()
    pipe.fold_ranker = False
    decoded = pipe(arc, farl, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(folded.shapes, decoded.shapes, rtol=0, atol=0)
    assert folded.scores.shape == (B, 4)
    # float32: the decoded path rounds (M - C) of ~100 mm coordinates (~5e-6 here); the folded one is closer to
    # a float64 reference (~3e-7)
    torch.testing.assert_close(folded.scores, decoded.scores, rtol=1e-4, atol=1e-5)
    top2 = decoded.scores.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    assert gap.min() > 10 * (folded.scores - decoded.scores).abs().max()  # well separated: argmax is stable
    assert torch.equal(folded.best, decoded.best)
    torch.testing.assert_close(folded.shape, decoded.shape, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_folded_ranker_on_cuda(flame) -> None:
    """With fast + compile on CUDA, IdRank runs the folded ranker's tensor work compiled (bf16): its logits
    follow the float32 scores of the decoded candidates (per image, correlation > 0.99 on 100 candidates)."""
    face_idx = flame.face_mask("face")
    torch.manual_seed(3)
    ranker = IdRanker(num_face_vertices=len(face_idx), input_norm=True)  # paper widths (4096, 1024, 256, 64)
    ranker.fit_input_normalization(candidate_vertices(flame, torch.randn(8, 16, 300), face_idx))
    pipe = _pipeline(flame, ranker=ranker, fast=True, compile=True).cuda()
    shapes, ctx = torch.randn(4, 100, 300, device="cuda"), torch.randn(4, 1024, device="cuda")
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = pipe._rank_shapes(shapes, ctx).float()
        ref = pipe.ranker(candidate_vertices(pipe.flame, shapes, pipe.face_idx), ctx)
    assert pipe._compiled_ranker is not None and got.shape == (4, 100)
    for g, r in zip(got, ref):
        assert torch.corrcoef(torch.stack([g, r]))[0, 1] > 0.99


def test_state_dict_holds_each_tensor_once_and_loads_strictly(flame) -> None:
    """The shape ranker's tensors are the ranker's and FLAME's: the state dict lists them once (under ranker.*),
    and a strict load into another pipeline restores them, the shape ranker's included (same tensors)."""
    pipe = _pipeline(flame)
    sd = pipe.state_dict()
    assert not [k for k in sd if k.startswith("shape_ranker.")]
    assert any(k.startswith("ranker.") for k in sd)  # (FLAME's tensors are not persistent: its model file is)
    ptrs = [v.data_ptr() for v in sd.values() if v.numel()]
    assert len(ptrs) == len(set(ptrs))  # no tensor twice
    other = _pipeline(flame, ranker=IdRanker(num_face_vertices=len(flame.face_mask("face")), widths=(32, 16)))
    with torch.no_grad():
        for p in other.ranker.parameters():
            p.add_(1.0)  # differ from pipe's
    other.load_state_dict(sd, strict=True)
    for (name, a), b in zip(pipe.ranker.state_dict().items(), other.shape_ranker.ranker.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in sd.items() if not k.startswith("ranker.")}, strict=True)
    nested = torch.nn.ModuleDict({"pipe": pipe}).state_dict()  # as a submodule too
    assert not [k for k in nested if "shape_ranker." in k] and any(k.startswith("pipe.ranker.") for k in nested)
    torch.nn.ModuleDict({"pipe": other}).load_state_dict(nested, strict=True)

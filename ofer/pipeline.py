"""The OFER pipeline: features -> IdGen N shapes -> IdRank -> best shape -> ExpGen N expressions.

Without ExpGen (`expgen=None`) it stops at the ranked identity, which is all the NoW benchmark scores.

IdRank scores the N shapes of an image straight from their coefficients by default (`fold_ranker`,
`ofer.models.ranker.ShapeRanker`: its first layer folded with FLAME's face rows, the same function as decoding
every candidate to face vertices in mm and scoring those, which `fold_ranker=False` does as the public code).

Everything is batched over images: B images x N hypotheses run as one denoiser batch of B*N rows per
sampling step, on whatever device the models live on.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from ofer.diffusion import GaussianDiffusion
from ofer.flame import FLAME, MM_PER_M
from ofer.io import file_sha256
from ofer.models.ranker import IdRanker, ShapeRanker, candidate_vertices
from ofer.tasks.generator import JAW
from ofer.training.checkpoint import (
    load_checkpoint, model_state_from_checkpoint, resolve_checkpoint_path,
)

log = logging.getLogger(__name__)

__all__ = ["Hypotheses", "OferPipeline", "load_generator", "load_ranker"]


@dataclass
class Hypotheses:
    """Output of the pipeline for B images and N hypotheses (coefficients; decode with FLAME)."""

    shapes: Tensor  # (B,N,300) IdGen samples
    scores: Tensor  # (B,N) IdRank logits (comparable within one image only)
    best: Tensor  # (B,) index of the ranked shape
    expressions: Tensor  # (B,N,50) ExpGen expression samples; (B,0,50) without ExpGen
    jaw: Tensor  # (B,N,3) ExpGen jaw axis-angle samples; (B,0,3) without ExpGen
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> Tensor:
        """The ranked identity (B,300)."""
        return self.shapes[torch.arange(self.shapes.shape[0], device=self.shapes.device), self.best]

    def select(self, i: int) -> "Hypotheses":
        return Hypotheses(self.shapes[i:i + 1], self.scores[i:i + 1], self.best[i:i + 1],
                          self.expressions[i:i + 1], self.jaw[i:i + 1], dict(self.meta))


def _check_kind(ckpt: dict, path: Path, allowed: tuple[str, ...]) -> None:
    kind = ckpt.get("task_name")
    if kind not in allowed:
        raise ValueError(f"{path}: a checkpoint of task {kind!r}, expected one of {list(allowed)}")


def load_generator(path: str | Path, *, kind: str, device: str | torch.device = "cpu",
                   use_ema: bool = True) -> tuple[nn.Module, GaussianDiffusion, dict]:
    """Rebuild an IdGen/ExpGen denoiser and its diffusion from a checkpoint (file or run dir) alone."""
    path = resolve_checkpoint_path(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    _check_kind(ckpt, path, (kind,))
    cfg = OmegaConf.create(ckpt["config"])
    model = instantiate(cfg.model)
    model.load_state_dict(model_state_from_checkpoint(ckpt, use_ema=use_ema), strict=True)
    diffusion = instantiate(cfg.diffusion)
    info = {"path": str(path), "step": int(ckpt["step"]), "sha256": file_sha256(path),
            "meta": ckpt.get("task_meta") or {}}
    return model.to(device).eval(), diffusion.to(device), info


def load_ranker(path: str | Path, *, device: str | torch.device = "cpu", use_ema: bool = True) -> tuple[nn.Module, dict]:
    path = resolve_checkpoint_path(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    _check_kind(ckpt, path, ("idrank",))
    cfg = OmegaConf.create(ckpt["config"])
    model = instantiate(cfg.model)
    model.load_state_dict(model_state_from_checkpoint(ckpt, use_ema=use_ema), strict=True)
    info = {"path": str(path), "step": int(ckpt["step"]), "sha256": file_sha256(path),
            "meta": ckpt.get("task_meta") or {}}
    return model.to(device).eval(), info


_SHARED = "shape_ranker."  # OferPipeline's submodule whose tensors are all the ranker's and FLAME's


def _drop_shared_entries(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post hook of OferPipeline: each tensor once (not again under shape_ranker.*)."""
    for key in [k for k in state_dict if k.startswith(prefix + _SHARED)]:
        del state_dict[key]


def _ignore_shared_missing(module: nn.Module, incompatible_keys) -> None:  # noqa: ANN001 -- torch's named tuple
    """Load post hook of OferPipeline: shape_ranker.* is loaded through ranker.* and flame.* (the same tensors)."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(_SHARED)
                                         and f".{_SHARED}" not in k]


class OferPipeline(nn.Module):
    """`pipeline(arcface (B,512), farl (B,512)) -> Hypotheses`.

    Args:
        flame: FLAME layer with the `face` mask (IdRank's input region).
        idgen, id_diffusion, id_sampling: the identity generator, its diffusion and sampler options
            (`sampler`, `steps`, `eta`, `timestep_spacing`; OFER: DDPM over all 1000 steps).
        expgen, exp_diffusion, exp_sampling: the same for expressions (53 = 50 expression + 3 jaw); expgen and
            exp_diffusion None: identity only (no expression samples).
        ranker: IdRank; `ranker(face_vertices_mm (B,N,Vf,3), ctx (B,1024)) -> (B,N)`, with Vf the `face` mask.
        num_samples: N hypotheses per image (OFER: 100).
        jaw_scale: factor on the sampled jaw. The public OFER code multiplies it by 0.5 at test time
            [code]; our default 1.0 keeps the distribution the model was trained on (set 0.5 to mimic it).
        fast: on CUDA, sample with CUDA graphs (`ofer.fast_sampling`, one capture per batch size) and the
            denoisers under bf16 autocast, one FiLM row per image and through `Denoiser.padded()` copies (the
            same function with widths rounded up to multiples of 8) with bf16 trunk weights; noise then comes from
            the default CUDA generator.
        compile: with `fast`, also `torch.compile` the sampling steps (denoiser trunk and sampler update; fuses
            their element-wise kernels;
            ~10-15 s of compilation per model and batch size, then 1.3x faster end to end on an H100, 74.8 vs
            58.6 images/s in the paper setting: without it the FiLM blocks already run as Triton kernels) and,
            with `fold_ranker`, the folded IdRank.
        fold_ranker: score the candidates from their shape coefficients (`shape_ranker`, a `ShapeRanker` over
            `ranker`; folded on first use, on the ranker's device, and again if its weights change) instead of
            decoding them to face vertices first. The same scores up to rounding, without B*N FLAME decodes and
            with a (w0, 300) instead of a (w0, Vf*3) per-candidate matmul. An attribute: switch it at any time.
    """

    def __init__(self, *, flame: FLAME, idgen: nn.Module, id_diffusion: GaussianDiffusion, expgen: nn.Module | None,
                 exp_diffusion: GaussianDiffusion | None, ranker: IdRanker, id_sampling: dict | None = None,
                 exp_sampling: dict | None = None, num_samples: int = 100, jaw_scale: float = 1.0,
                 meta: dict | None = None, fast: bool = False, compile: bool = False,
                 fold_ranker: bool = True) -> None:
        super().__init__()
        self.fast, self.compile = fast, compile
        self._graphed: dict[tuple, object] = {}
        self._compiled_ranker: Any = None
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if (expgen is None) != (exp_diffusion is None):
            raise ValueError("expgen and exp_diffusion go together: both given, or both None (identity only)")
        self.flame, self.idgen, self.expgen, self.ranker = flame, idgen, expgen, ranker
        self.id_diffusion, self.exp_diffusion = id_diffusion, exp_diffusion
        self.id_sampling = dict(id_sampling or {"sampler": "ddpm"})
        self.exp_sampling = dict(exp_sampling or {"sampler": "ddpm"})
        self.num_samples = num_samples
        self.jaw_scale = jaw_scale
        self.meta = dict(meta or {})
        self.register_buffer("face_idx", flame.face_mask("face"), persistent=False)
        self.fold_ranker = bool(fold_ranker)
        # Cheap to build (the fold waits for the first call); a submodule, so `.to`/`.eval` reach it. Its tensors
        # are the ranker's and FLAME's, already saved under ranker.* and flame.*: the state dict leaves them out.
        self.shape_ranker = ShapeRanker(ranker, flame, self.face_idx)
        self.register_state_dict_post_hook(_drop_shared_entries)
        self.register_load_state_dict_post_hook(_ignore_shared_missing)

    @torch.no_grad()
    def forward(self, arcface: Tensor, farl: Tensor, *, generator: torch.Generator | None = None,
                stage_seconds: dict[str, float] | None = None) -> Hypotheses:
        """Hypotheses of B images from their features: arcface (B,512), farl (B,512). `stage_seconds`, if given,
        receives the wall time of each stage (idgen, decode, idrank, expgen), synchronising CUDA between stages
        (for benchmarks/bench_pipeline.py; it serialises the stages, so leave it None otherwise). With
        `fold_ranker` nothing is decoded: `decode` is ~0 s and IdRank works from the coefficients."""
        if arcface.ndim != 2 or farl.ndim != 2 or arcface.shape[0] != farl.shape[0]:
            raise ValueError(f"pipeline: arcface (B,512) and farl (B,512) expected, got {tuple(arcface.shape)} "
                             f"and {tuple(farl.shape)}")

        def lap(name: str) -> None:
            nonlocal t_last
            if stage_seconds is not None:
                if arcface.is_cuda:
                    torch.cuda.synchronize(arcface.device)
                now = time.perf_counter()
                stage_seconds[name], t_last = now - t_last, now

        N = self.num_samples
        arcface, farl = arcface.float(), farl.float()
        ctx = torch.cat([arcface, farl], dim=-1)  # (B,1024) OFER: ArcFace (+) FaRL
        t_last = time.perf_counter()
        shapes = self._sample("id", arcface, 300, N, generator)  # (B,N,300)
        lap("idgen")
        bf16 = self.fast and shapes.is_cuda  # bf16 IdRank matmuls on the fast path
        if self.fold_ranker:
            lap("decode")  # nothing to decode: the folded ranker takes the coefficients
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                scores = self._rank_shapes(shapes, ctx).float()  # (B,N)
        else:
            verts = candidate_vertices(self.flame, shapes, self.face_idx)  # (B,N,Vf,3) mm
            lap("decode")
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                scores = self.ranker(verts, ctx).float()  # (B,N)
        best = scores.argmax(dim=1)
        lap("idrank")
        if self.expgen is None:
            exp = shapes.new_zeros(shapes.shape[0], 0, 53)
        else:
            exp = self._sample("exp", ctx, 53, N, generator)  # (B,N,53)
        lap("expgen")
        return Hypotheses(shapes=shapes, scores=scores, best=best, expressions=exp[..., :50],
                          jaw=exp[..., 50:53] * self.jaw_scale, meta=dict(self.meta))

    def _rank_shapes(self, shapes: Tensor, ctx: Tensor) -> Tensor:
        """IdRank logits (B,N) of the shapes through the folded ranker; with `fast` and `compile` on CUDA its
        tensor work is torch.compile'd (the bf16 IdRank MLP over B*N rows is element-wise bound: on an H100 at
        4,096 images x 100 candidates, 84 ms eager -> 17 ms compiled, BENCHMARKS.md)."""
        sr = self.shape_ranker
        if not (self.fast and self.compile and shapes.is_cuda):
            return sr(shapes, ctx)
        sr.check_inputs(shapes, ctx)
        sr.fold()  # eager: the cheap refold check, outside the compiled function
        if self._compiled_ranker is None:
            from ofer.fast_sampling import COMPILE_OPTIONS

            self._compiled_ranker = torch.compile(sr.folded_logits, options=dict(COMPILE_OPTIONS) or None)
        return self._compiled_ranker(shapes, ctx)

    def _sample(self, which: str, cond: Tensor, dim: int, n: int, generator: torch.Generator | None) -> Tensor:
        diffusion, model, opts = ((self.id_diffusion, self.idgen, self.id_sampling) if which == "id"
                                  else (self.exp_diffusion, self.expgen, self.exp_sampling))
        if not (self.fast and cond.is_cuda):
            return diffusion.sample(model, cond, dim=dim, num_samples=n, generator=generator, **opts)
        from ofer.fast_sampling import GraphedSampler

        key = (which, cond.shape[0], n, str(cond.device))  # a sampler keeps one FiLM row per image
        if key not in self._graphed:
            self._graphed[key] = GraphedSampler(diffusion, model, rows=cond.shape[0] * n, dim=dim,
                                                cond_dim=cond.shape[1], device=cond.device,
                                                compile=self.compile, num_samples=n, **opts)
        return self._graphed[key](cond, num_samples=n)  # type: ignore[operator]

    @torch.no_grad()
    def decode(self, h: Hypotheses, i: int, *, max_expressions: int | None = None) -> dict[str, Tensor]:
        """Meshes of image i in metres: `neutral` (V,3) ranked shape, `samples` (N,V,3) neutral IdGen samples,
        `expressions` (M,V,3) ranked shape + each expression sample, and their NoW landmarks (.., 7, 3)."""
        flame = self.flame
        dev = flame.v_template.device
        shapes = h.shapes[i].to(dev)
        best = int(h.best[i])
        M = h.expressions.shape[1] if max_expressions is None else min(max_expressions, h.expressions.shape[1])
        exp = torch.zeros(M, flame.n_exp, device=dev)
        exp[:, :50] = h.expressions[i, :M].to(dev)
        pose = torch.zeros(M, 15, device=dev)
        pose[:, JAW] = h.jaw[i, :M].to(dev)
        neutral = flame(shapes[best:best + 1])
        # max_expressions=0: no expression meshes (FLAME's skinning does not take an empty batch).
        expr = flame(shapes[best:best + 1].expand(M, -1), exp, pose) if M else neutral
        out = {"neutral": neutral.vertices[0], "samples": flame.shape_vertices(shapes),
               "expressions": expr.vertices[:M]}
        if flame.landmark_ids:
            out["neutral_landmarks"] = neutral.now_landmarks()[0]
            out["expression_landmarks"] = expr.now_landmarks()[:M]
        return out


def build_pipeline(cfg: Any, flame: FLAME, *, device: str | torch.device) -> OferPipeline:
    """From the `pipeline` config block: checkpoints by path, sampler options, N, jaw scale;
    `expgen_ckpt: null` builds an identity-only pipeline.

    An IdRank trained on candidate pools of another IdGen checkpoint is reported (its pools' hash is
    stored in the IdRank checkpoint's task metadata)."""
    idgen, id_diff, id_info = load_generator(cfg.idgen_ckpt, kind="idgen", device=device)
    expgen = exp_diff = None
    exp_info: dict = {"path": None}
    if cfg.expgen_ckpt is not None:
        expgen, exp_diff, exp_info = load_generator(cfg.expgen_ckpt, kind="expgen", device=device)
    ranker, rank_info = load_ranker(cfg.idrank_ckpt, device=device)
    trained_on = rank_info["meta"].get("idgen_sha256")
    mismatch = bool(trained_on) and trained_on != id_info["sha256"]
    if mismatch:
        log.warning("IdRank %s was trained on candidates of IdGen checkpoint %s..., not of %s (%s...): ranking "
                    "quality may differ", rank_info["path"], trained_on[:12], id_info["path"], id_info["sha256"][:12])
    meta = {"idgen": id_info["path"], "expgen": exp_info["path"], "idrank": rank_info["path"],
            "idrank_idgen_mismatch": mismatch}
    to_dict = (lambda c: OmegaConf.to_container(c, resolve=True) if c is not None else None)
    return OferPipeline(flame=flame.to(device), idgen=idgen, id_diffusion=id_diff, expgen=expgen,
                        exp_diffusion=exp_diff, ranker=ranker, id_sampling=to_dict(cfg.id_sampling),
                        exp_sampling=to_dict(cfg.exp_sampling), num_samples=int(cfg.num_samples),
                        jaw_scale=float(cfg.jaw_scale), meta=meta, fast=bool(cfg.get("fast", False)),
                        compile=bool(cfg.get("compile", False))).to(device)


def spread_mm(samples: Tensor) -> np.ndarray:
    """Per-vertex spread across samples (V,) in mm: sqrt(mean_n ||x_vn - mean_n x_vn||^2)."""
    centred = samples - samples.mean(0, keepdim=True)
    return (centred.pow(2).sum(-1).mean(0).sqrt() * MM_PER_M).cpu().numpy()

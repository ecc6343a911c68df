"""End-to-end CPU smoke tests of the jobs, composed from the real configs and shrunk: IdGen, ExpGen, IdRank
training (with resume), reconstruction into the NoW layout, and the bad-input paths around them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import ofer
from ofer.synthetic.dataset import write_mica_dataset

CONFIGS = str(Path(ofer.__file__).resolve().parent.parent / "configs")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory, synthetic_flame, flame):
    """A tiny synthetic data root: the FLAME files and six small MICA-layout sets."""
    root = tmp_path_factory.mktemp("synth")
    (root / "FLAME").symlink_to(synthetic_flame.flame_model.parent)
    write_mica_dataset(root, "SYNTH_TRAIN", flame, actors=5, images_per_actor=2, seed=1)
    write_mica_dataset(root, "SYNTH_TEST", flame, actors=3, images_per_actor=1, seed=2)
    write_mica_dataset(root, "SYNTH_ID_TRAIN", flame, actors=5, images_per_actor=2, seed=5)  # IdGen's default sets
    write_mica_dataset(root, "SYNTH_ID_TEST", flame, actors=3, images_per_actor=1, seed=6)
    write_mica_dataset(root, "SYNTHEXP_TRAIN", flame, actors=8, images_per_actor=1, mode="frame", seed=3)
    write_mica_dataset(root, "SYNTHEXP_TEST", flame, actors=3, images_per_actor=1, mode="frame", seed=4)
    return root


def _cfg(name, root, run_dir, *extra):
    overrides = [f"paths.synthetic_dir={root}", f"paths.data_dir={root}", f"paths.output_dir={run_dir}",
                 "device=cpu", *extra]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_trainer_fast_preset_is_the_default_with_the_speed_switches_on(tmp_path):
    """`trainer=fast` (configs/trainer/fast.yaml) composes into every training job as the default trainer group with
    bf16, compile and cuda_graph on, and nothing else changed; the result is a valid TrainerConfig."""
    from omegaconf import OmegaConf

    from ofer.training.config import TrainerConfig

    switches = {"precision": "bf16", "compile": True, "cuda_graph": True}
    for job in ("train_idgen", "train_expgen", "train_idrank", "train_baseline"):
        base = OmegaConf.to_container(_cfg(job, tmp_path, tmp_path)["trainer"], resolve=True)
        fast = OmegaConf.to_container(_cfg(job, tmp_path, tmp_path, "trainer=fast")["trainer"], resolve=True)
        assert {k: v for k, v in fast.items() if base.get(k) != v} == switches, job
        assert fast.keys() == base.keys(), job
        TrainerConfig.from_mapping(fast)


SMALL_GEN = ["synthetic.ensure=false", "trainer.ckpt_every=2", "trainer.log_every=1", "eval.num_items=2",
             "eval.num_samples=3", "eval.sampling.steps=3", "trainer.warmup_steps=0", "trainer.progress=false"]


@pytest.fixture(scope="module")
def idgen_run(tiny_root, tmp_path_factory):
    from ofer.jobs import train_generator

    run = tmp_path_factory.mktemp("idgen")
    res = train_generator(_cfg("train_idgen", tiny_root, run, "trainer.max_steps=4", "trainer.batch_size=2",
                               *SMALL_GEN), run_dir=run)
    return run, res


@pytest.fixture(scope="module")
def expgen_run(tiny_root, tmp_path_factory):
    from ofer.jobs import train_generator

    run = tmp_path_factory.mktemp("expgen")
    res = train_generator(_cfg("train_expgen", tiny_root, run, "trainer.max_steps=3", "trainer.batch_size=4",
                               *SMALL_GEN), run_dir=run)
    return run, res


def test_idgen_trains_and_resumes(idgen_run, tiny_root):
    from ofer.jobs import train_generator
    from ofer.training import load_checkpoint

    run, res = idgen_run
    assert res.step == 4 and (run / "checkpoints" / "last.pt").is_file()
    for k in ("eval/err_mean_sample", "eval/err_best_of_n", "eval/err_prior", "eval/denoise_loss",
              "eval/denoise_loss_untrained", "eval/err_mean_sample_other_cond"):
        assert np.isfinite(res.metrics[k])
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["task_name"] == "idgen" and ck["config"]["model"]["dim"] == 300
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_q0" in x for x in lines)  # loss per timestep quartile
    # Resume: the same run dir continues from step 4 to 6 instead of starting over.
    res2 = train_generator(_cfg("train_idgen", tiny_root, run, "trainer.max_steps=6", "trainer.batch_size=2",
                                *SMALL_GEN), run_dir=run)
    assert res2.step == 6
    # A checkpoint from another config is refused, naming the key.
    with pytest.raises(Exception, match="model"):
        train_generator(_cfg("train_idgen", tiny_root, run, "trainer.max_steps=8", "trainer.batch_size=2",
                             "model.widths=[300,40,10]", *SMALL_GEN), run_dir=run)


def test_idgen_script_trains_on_two_processes_and_resumes_on_one(tiny_root, tmp_path):
    """`torchrun --nproc_per_node=2 scripts/train_idgen.py` (gloo on the CPU), the README's two-GPU command: with the
    default trainer.grad_sync=auto both processes train without DDP's wrapper (event grad_sync: flat, 2 processes),
    rank 0 alone writes the log and the checkpoints, and one process resumes the run (its RNG seeded afresh, as
    the number of processes changed)."""
    from ofer.jobs import train_generator
    from ofer.training import load_checkpoint

    run = tmp_path / "run"
    overrides = [f"paths.synthetic_dir={tiny_root}", f"paths.data_dir={tiny_root}", f"paths.output_dir={run}",
                 f"hydra.run.dir={run}", "device=cpu", "trainer.max_steps=4", "trainer.batch_size=4", *SMALL_GEN]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "scripts/train_idgen.py", *overrides]
    proc = subprocess.run(cmd, cwd=Path(CONFIGS).parent, check=False, timeout=900, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in run.glob("metrics*.jsonl")] == ["metrics.jsonl"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(x["mode"], x["world_size"]) for x in lines if x.get("event") == "grad_sync"] == [("flat", 2)]
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["world_size"] == 2 and ck["step"] == 4 and ck["task_name"] == "idgen"
    res = train_generator(_cfg("train_idgen", tiny_root, run, "trainer.max_steps=6", "trainer.batch_size=4",
                               *SMALL_GEN), run_dir=run)
    assert res.step == 6
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["old_world_size"] for x in lines if x.get("event") == "rng_reseeded_on_resume"] == [2]


def _eager_and_compiled(train_job, job, tiny_root, tmp_path, args, compiled):
    """Runs `job` for 3 steps eagerly and with the `compiled` overrides, from the same seed: per run ("eager",
    "compiled") its last checkpoint and its metrics.jsonl records. Checks that the compiled run really compiled
    and compiled the whole loss (its `compile` event) into one graph: no graph break (each one a host sync per
    step and no CUDA graph), no recompilation after the first step."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ofer.training import load_checkpoint

    out = {}
    for name, extra in (("eager", []), ("compiled", compiled)):
        torch._dynamo.reset()
        counters.clear()
        run = tmp_path / name
        res = train_job(_cfg(job, tiny_root, run, "trainer.max_steps=3", "trainer.ckpt_every=3", *args, *extra),
                        run_dir=run)
        assert res.step == 3
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        if extra:
            assert counters["stats"]["unique_graphs"] == 1, dict(counters["graph_break"])
            assert [x["scope"] for x in lines if x.get("event") == "compile"] == ["loss"]
        out[name] = (load_checkpoint(run / "checkpoints" / "last.pt"), lines)
    return out


@pytest.mark.slow
def test_idgen_with_its_loss_compiled_trains_like_eager(tiny_root, tmp_path):
    """trainer.compile_scope=loss on the real IdGen task (random t and noise, q_sample, the denoiser, the L1 loss in
    one compiled graph; CPU, float32, a small denoiser) trains like the eager run: the same loss at every step (so
    the draws inside the graph are the eager RNG stream's: inductor's own draws gave 0.516 for 0.392) and
    the same weights and EMA after 3 AdamW steps up to a fifth of one step (lr 1e-3; AdamW turns float32 rounding
    of near-zero gradients into up to 6% of a step, measured: 5.8e-5)."""
    from ofer.jobs import train_generator

    runs = _eager_and_compiled(train_generator, "train_idgen", tiny_root, tmp_path,
                               ["trainer.batch_size=4", "model.widths=[300,40,10]", *SMALL_GEN],
                               ["trainer.compile=true", "trainer.compile_scope=loss"])
    final = {name: ckpt for name, (ckpt, _) in runs.items()}
    losses = {name: [x["loss"] for x in lines if "loss" in x] for name, (_, lines) in runs.items()}
    assert len(losses["compiled"]) == 3
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=1e-5)
    for part in ("model", "ema"):
        for k, v in final["eager"][part].items():
            torch.testing.assert_close(final["compiled"][part][k], v, atol=2e-4, rtol=0, msg=f"{part}.{k}")


@pytest.mark.slow
def test_idrank_with_its_loss_compiled_trains_like_eager(idgen_run, tiny_root, tmp_path):
    """trainer.compile=true with the default compile_scope (auto: the task's whole loss in one process) on the IdRank
    task (FLAME decoding of the candidates, ranking targets, the ranker, the ListNet loss) trains like eager: the same
    loss and gradient norm at every step (CPU, float32). Its weights after 3 AdamW steps (lr 1e-4) agree only up to
    2 lr per step: the last blocks' near-zero gradients are float32 rounding, whose sign AdamW turns into a full step
    (measured: 2.6e-4 on one element of layers.4.shift, 5e-6 or less on the first blocks)."""
    from ofer.jobs import train_idrank

    runs = _eager_and_compiled(train_idrank, "train_idrank", tiny_root, tmp_path,
                               [f"idgen_ckpt={idgen_run[0]}", "synthetic.ensure=false", "trainer.batch_size=2",
                                "trainer.log_every=1", "trainer.progress=false", "pool.num_candidates=4",
                                "pool.sampling.steps=2", f"pool.dir={tmp_path / 'pools'}"],
                               ["trainer.compile=true"])
    final = {name: ckpt for name, (ckpt, _) in runs.items()}
    losses = {name: [(x["loss"], x["grad_norm"]) for x in lines if "loss" in x] for name, (_, lines) in runs.items()}
    assert len(losses["compiled"]) == 3
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=1e-5)
    for k, v in final["eager"]["model"].items():
        torch.testing.assert_close(final["compiled"]["model"][k], v, atol=6e-4, rtol=0, msg=k)


def test_padded_training_matches_and_saves_the_original_layout(tiny_root, tmp_path):
    """pad_widths=true trains the denoiser's padded copy: the same run as pad_widths=false (same seed: the same
    weights after 3 AdamW steps, up to float32 rounding, against the unpadded model trained as such), checkpoints
    (weights and EMA) in the original layout that load strictly into the unpadded model, a resume with the same
    setting, and a clear error for a resume with the other one (its AdamW moments have the padded shapes)."""
    from ofer.jobs import train_generator
    from ofer.models.unet1d import Denoiser
    from ofer.training import load_checkpoint
    from ofer.training.checkpoint import ConfigMismatchError

    args = ["trainer.max_steps=3", "trainer.batch_size=2", "trainer.ckpt_every=3", *SMALL_GEN]
    runs = {}
    for pad in ("true", "false"):
        run = tmp_path / pad
        train_generator(_cfg("train_idgen", tiny_root, run, f"pad_widths={pad}", *args), run_dir=run)
        runs[pad] = load_checkpoint(run / "checkpoints" / "last.pt")
    padded, plain = runs["true"], runs["false"]
    assert padded["model"]["in_proj.weight"].shape == (300, 300)  # the original layout
    for key in ("model", "ema"):
        net = Denoiser(**{k: v for k, v in padded["config"]["model"].items() if k != "_target_"})
        net.load_state_dict(padded[key])  # strict
    # The same training: the two runs differ by much less than 3 steps moved the weights (AdamW divides each
    # gradient by its own scale, so a rounding difference in a near-zero gradient can move one weight by up to a
    # step; the float64 gradient test in test_unet1d.py checks equality itself).
    def dist(a: dict, b: dict) -> float:
        return sum(float((a[n].double() - b[n].double()).square().sum()) for n in a) ** 0.5

    moved = dist(plain["model"], plain["ema"])  # the EMA (decay 0.995) is still ~ the initial weights
    print(f"padded vs plain {dist(padded['model'], plain['model']):.3g}, moved {moved:.3g}")
    assert moved > 0.1 and dist(padded["model"], plain["model"]) < 5e-3 * moved
    # The padding got exactly zero gradients in the real loop: its AdamW moments (saved in the padded shapes, in
    # the order of the padded copy's parameters) are exactly zero there.
    pad = net.padded()
    state = padded["optimizer"]["state"]
    for i, (name, p) in enumerate(pad.named_parameters()):
        numbers = torch.arange(p.numel(), dtype=torch.float64).view(p.shape)
        keep = torch.zeros(p.numel(), dtype=torch.bool)
        keep[pad.unpad({name: numbers})[name].flatten().long()] = True
        for moment in ("exp_avg", "exp_avg_sq"):
            m = state[i][moment]
            assert m.shape == p.shape and m.flatten()[~keep].abs().sum() == 0, (name, moment)
    res = train_generator(_cfg("train_idgen", tiny_root, tmp_path / "true", "pad_widths=true", *args[1:],
                               "trainer.max_steps=4"), run_dir=tmp_path / "true")
    assert res.step == 4
    with pytest.raises(ConfigMismatchError, match=r"pad_widths \(there: True\)"):
        train_generator(_cfg("train_idgen", tiny_root, tmp_path / "true", "pad_widths=false", *args[1:],
                             "trainer.max_steps=5"), run_dir=tmp_path / "true")
    with pytest.raises(ValueError, match="pad_widths must be auto, true or false"):
        train_generator(_cfg("train_idgen", tiny_root, tmp_path / "bad", "pad_widths=sometimes", *args),
                        run_dir=tmp_path / "bad")


def test_training_copy_pads_what_it_can_and_names_what_it_cannot():
    """pad_widths: auto pads only on CUDA and only a paddable model; true refuses the others with their reason."""
    from ofer.jobs import training_copy
    from ofer.models.unet1d import Denoiser

    plain, grouped = Denoiser(dim=8, cond_dim=4, widths=(12, 4)), Denoiser(dim=8, cond_dim=4, widths=(8, 4), groups=2)
    assert training_copy(plain, "auto", "cpu") is plain and training_copy(grouped, "auto", "cuda") is grouped
    assert training_copy(plain, True, "cpu").widths == (16, 8) and training_copy(plain, False, "cuda") is plain
    with pytest.raises(ValueError, match="groups=1 .* got Denoiser with groups=2; set pad_widths=false"):
        training_copy(grouped, "true", "cpu")
    with pytest.raises(ValueError, match=r"groups=1 \(already padded\)"):
        training_copy(plain.padded(), "true", "cpu")


def test_expgen_trains(expgen_run):
    run, res = expgen_run
    assert res.step == 3 and np.isfinite(res.metrics["eval/err_mean_sample"])


def test_dimension_mismatch_is_reported(tiny_root, tmp_path):
    from ofer.jobs import train_generator

    with pytest.raises(ValueError, match=r"cond_dim=1024|has 512 values"):
        train_generator(_cfg("train_idgen", tiny_root, tmp_path, "trainer.max_steps=1", "trainer.batch_size=2",
                             "model.cond_dim=1024", *SMALL_GEN), run_dir=tmp_path)


def test_idrank_reconstruct_and_now_layout(idgen_run, expgen_run, tiny_root, tmp_path, flame):
    from ofer.jobs import train_idrank
    from ofer.meshio import load_mesh
    from ofer.reconstruct import reconstruct

    idgen_ckpt = idgen_run[0] / "checkpoints" / "last.pt"
    rank_dir = tmp_path / "idrank"
    # idgen_ckpt as a run dir (the README's form), resolved to its checkpoints/last.pt
    res = train_idrank(_cfg("train_idrank", tiny_root, rank_dir, f"idgen_ckpt={idgen_run[0]}", "synthetic.ensure=false",
                            "trainer.max_steps=2", "trainer.batch_size=2", "trainer.progress=false",
                            "pool.num_candidates=4", "pool.sampling.steps=2", f"pool.dir={rank_dir / 'pools'}"),
                       run_dir=rank_dir)
    assert res.step == 2 and np.isfinite(res.metrics["eval/ranked_error_mm"])
    assert 0 <= res.metrics["eval/best_error_mm"] <= res.metrics["eval/mean_error_mm"]
    assert (rank_dir / "pools" / "train.npz").is_file()

    # Reconstruct two test photos (annotated 5 points, no detector), plus one corrupt file.
    imgs = sorted((tiny_root / "SYNTH_TEST" / "arcface_input").rglob("*.jpg"))[:2]
    folder = tmp_path / "photos" / "SUBJ" / "multiview_occlusions"
    folder.mkdir(parents=True)
    ann = {}
    for k, img in enumerate(imgs):
        (folder / f"IMG_{k}.jpg").write_bytes(img.read_bytes())
        gt = np.load(str(img).replace(".jpg", "_gt.npz"))
        ann[f"SUBJ/multiview_occlusions/IMG_{k}"] = {"kps": gt["kps"].tolist(), "box": gt["box"].tolist()}
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    out = tmp_path / "recon"
    cfg = _cfg("reconstruct", tiny_root, out, f"input={tmp_path / 'photos'}",
               f"pipeline.idgen_ckpt={idgen_ckpt}", f"pipeline.expgen_ckpt={expgen_run[0]}",
               f"pipeline.idrank_ckpt={rank_dir}", "pipeline.num_samples=3", "pipeline.id_sampling.steps=2",
               "pipeline.exp_sampling.steps=2", f"preprocess.annotations={tmp_path / 'ann.json'}",
               "preprocess.detector=false", f"output.dir={out}", f"output.now_dir={out / 'now'}",
               "output.max_expression_meshes=2")
    summary = reconstruct(cfg)
    assert summary["reconstructed"] == 2 and summary["failed"] == 1
    assert "broken.jpg" in summary["failures"][0]["path"]
    for k in range(2):
        v, f = load_mesh(out / "now" / "SUBJ" / "multiview_occlusions" / f"IMG_{k}.obj")
        lm = np.load(out / "now" / "SUBJ" / "multiview_occlusions" / f"IMG_{k}.npy")
        assert v.shape == (flame.num_vertices, 3) and lm.shape == (7, 3)
        assert np.ptp(v[:, 1]) > 50  # millimetres (a head in metres spans ~0.3); untrained models: no upper bound
        d = out / "SUBJ" / "multiview_occlusions" / f"IMG_{k}"
        h = np.load(d / "hypotheses.npz")
        assert h["shapes"].shape == (3, 300) and h["scores"].shape == (3,) and 0 <= int(h["best"]) < 3
        assert bool(h["meta_synthetic_encoders"]) and (d / "contact_sheet.png").stat().st_size > 1000
        assert (d / "expression_001.obj").is_file() and not (d / "expression_002.obj").exists()
    # A rerun skips what is done; a checkpoint of the wrong kind is refused by name.
    assert reconstruct(cfg)["skipped_existing"] == 2
    bad = _cfg("reconstruct", tiny_root, out, f"input={tmp_path / 'photos'}", f"pipeline.idgen_ckpt={rank_dir}",
               f"pipeline.expgen_ckpt={expgen_run[0]}", f"pipeline.idrank_ckpt={rank_dir}", f"output.dir={out}")
    with pytest.raises(ValueError, match="task 'idrank', expected one of \\['idgen'\\]"):
        reconstruct(bad)


def test_empty_folder_is_an_error(tmp_path):
    from ofer.reconstruct import list_images

    with pytest.raises(FileNotFoundError, match="holds no images"):
        list_images(tmp_path)


def test_ranking_with_one_sample(flame):
    from ofer.models.ranker import IdRanker, candidate_vertices

    face = flame.face_mask("face")
    r = IdRanker(num_face_vertices=len(face), widths=(64, 16), groups=8)
    logits = r(candidate_vertices(flame, torch.randn(2, 1, 300), face), torch.randn(2, 1024))
    assert logits.shape == (2, 1) and torch.softmax(logits, 1).eq(1).all()


def test_baseline_regressor_learns(tiny_root, tmp_path):
    """The deterministic baseline trains on the same data and beats its starting point (the template) on the
    identities it saw. Evaluated on those: with 5 training identities, the error on 3 unseen ones is chance
    (3.50 or 3.66 mm against the template's 3.52, depending on the pixel encoder's contrast mode)."""
    from ofer.jobs import train_baseline

    run = tmp_path / "baseline"
    cfg = _cfg("train_baseline", tiny_root, run, "synthetic.ensure=false", "trainer.max_steps=40",
               "trainer.batch_size=4", "trainer.ckpt_every=40", "trainer.lr=3e-3", "trainer.warmup_steps=0",
               "trainer.ema_decay=0", "trainer.progress=false", "eval_data.datasets.synthetic.name=SYNTH_TRAIN")
    res = train_baseline(cfg, run_dir=run)
    assert res.step == 40
    # The template (all-zero coefficients) is what the zero-initialised regressor predicts at step 0.
    from ofer.jobs import feature_dataset
    from ofer.tasks.baseline import RegressionTask, ShapeRegressor
    from ofer.config import build_flame

    flame = build_flame(cfg.paths)
    zero = ShapeRegressor()
    task = RegressionTask(model=zero, flame=flame, dataset=[None],
                          eval_dataset=feature_dataset(cfg, cfg.eval_data, ["arcface"], "cpu"))
    # Measured: 0.95 mm against the template's 2.92 mm.
    assert res.metrics["eval/face_error_mm"] < 0.5 * task.evaluate(zero)["face_error_mm"]


def test_other_condition_control_of_the_generator_evaluation() -> None:
    """`err_mean_sample_other_cond` samples with each item's condition replaced by the next item's, from the same
    noise: for a network that ignores the condition it equals `err_mean_sample` exactly; for one whose output is
    the condition, it differs."""
    from ofer.diffusion import GaussianDiffusion
    from ofer.tasks.generator import GeneratorTask

    g = torch.Generator().manual_seed(0)
    items = [{"shape": torch.randn(300, generator=g), "arcface_feat": torch.randn(1, 300, generator=g)}
             for _ in range(4)]

    class Net(torch.nn.Module):
        def __init__(self, use_cond: bool) -> None:
            super().__init__()
            self.use_cond, self.dim, self.cond_dim = use_cond, 300, 300
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, c):  # noqa: ANN001, ANN202
            return 0.1 * x + (0.5 * c if self.use_cond else 0.0)

    results = {}
    for use_cond in (False, True):
        net = Net(use_cond)
        task = GeneratorTask(name="idgen", model=net, diffusion=GaussianDiffusion(num_steps=50), dataset=items,
                             target="shape", cond_keys=["arcface_feat"], eval_dataset=items, eval_items=4,
                             eval_samples=3, eval_sampling={"sampler": "ddim", "steps": 5})
        results[use_cond] = task.evaluate(net)
    off, on = results[False], results[True]
    assert off["err_mean_sample_other_cond"] == off["err_mean_sample"]
    assert abs(on["err_mean_sample_other_cond"] - on["err_mean_sample"]) > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scope", ["model", "loss"])
@pytest.mark.parametrize("job", ["train_idgen", "train_expgen"])
def test_generators_train_with_cuda_graphs_on_cuda(job, scope, tiny_root, tmp_path):
    """The real IdGen/ExpGen tasks (bf16, compiled: the model, or the whole loss with trainer.compile_scope=loss;
    our attention kernels with their backward) are captured by trainer.cuda_graph=true and train on from the
    graphs: a capture event, no failure, finite losses."""
    from ofer.jobs import train_generator

    res = train_generator(_cfg(job, tiny_root, tmp_path, "trainer.max_steps=6", "trainer.batch_size=4",
                               "trainer.cuda_graph=true", "trainer.compile=true", f"trainer.compile_scope={scope}",
                               "trainer.precision=bf16", "device=cuda", *SMALL_GEN), run_dir=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [x["event"] for x in lines if "event" in x]
    assert "cuda_graph_captured" in events and "cuda_graph_failed" not in events, events
    assert "cuda_graph_batch_mismatch" not in events, lines  # every later step replayed the graphs
    # trainer.reduction_launch=one_row (the default) was active: one count of relaunched kernels at the end (none
    # here: the small test widths have no 257-512-column norms)
    assert [x["kernels"] for x in lines if x.get("event") == "reduction_relaunched"] == [0], lines
    losses = [x["loss"] for x in lines if "loss" in x]
    assert res.step == 6 and len(losses) == 6 and all(np.isfinite(losses))

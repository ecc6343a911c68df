"""Gaussian diffusion over FLAME parameter vectors: schedule, training loss and samplers.

Independent of the network: every method takes the noise predictor `model(x (M, D), t (M,) int64, cond (M, C))`
as an argument. OFER settings [code]: 1000 steps, linear betas 1e-4 .. 1e-2 (not the usual 0.02), epsilon
prediction, L1 loss on the noise, t uniform, no clipping, no data normalisation.

Samplers (all checked against diffusers' schedulers in tests/test_diffusion.py):
* ``ddpm``: ancestral sampling over all num_steps with the posterior variance beta~_t (diffusers'
  ``variance_type="fixed_small"``).
* ``ddim``: DDIM (Song et al. 2021) over ``steps`` timesteps with stochasticity ``eta``; each step goes from
  t_i to the *next sampled* timestep t_{i+1} (the public OFER "DDIM" goes to t_i - 1 instead, which is wrong).
* ``dpmpp``: DPM-Solver++(2M) (Lu et al. 2022), deterministic multistep, first order at the first and the
  last step (diffusers' ``final_sigmas_type="zero"``).

Timesteps for ``ddim`` / ``dpmpp`` (``timestep_spacing``):
* ``"trailing"`` (default, our choice): t_i = round(T (n - i) / n) - 1, i = 0..n-1, so the first model call is
  at t = T - 1, the timestep training saw with the least signal. This matters for OFER's schedule: with
  beta_T = 0.01, alpha_bar_{T-1} = 0.0064, so x_{T-1} still holds 8 % of the signal and starting lower
  ("leading", t_0 = T - T/n) wastes part of the schedule (Lin et al. 2024, "Common diffusion noise schedules
  and sample steps are flawed", Table 2).
* ``"leading"``: t_i = (n - 1 - i) * (T // n), as diffusers' DDIMScheduler ``"leading"`` (steps_offset 0).
After the last timestep all samplers land on the clean sample (alpha_bar = 1, diffusers' ``set_alpha_to_one``).

Every step of every sampler is the same affine update (see ``denoise_step``), with one row of precomputed
coefficients per step (``SamplerPlan``); the loop therefore never syncs with the host and the step can be
wrapped in torch.compile or a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "GaussianDiffusion",
    "SamplerPlan",
    "denoise_step",
    "make_betas",
    "SCHEDULES",
    "LOSSES",
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
]

SCHEDULES = ("linear", "cosine")
LOSSES = ("l1", "mse")
SAMPLERS = ("ddpm", "ddim", "dpmpp")
TIMESTEP_SPACINGS = ("trailing", "leading")

NoisePredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Columns of SamplerPlan.coeffs. One step, from x at timestep t_i with predicted noise eps:
#   x0     = A x - B eps                      (clean-sample estimate)
#   D      = W_CUR x0 + W_PREV x0_prev        (x0_prev: estimate of the previous step; DPM-Solver++(2M))
#   x_next = P x + Q D + R eps + S z          (z ~ N(0, I), only for stochastic plans)
A, B, W_CUR, W_PREV, P, Q, R, S = range(8)
_NUM_COEFFS = 8


def make_betas(schedule: str, num_steps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Noise schedule beta_t, t = 0..num_steps-1, float64.

    ``"linear"``: evenly spaced from beta_start to beta_end (OFER: 1e-4 .. 1e-2).
    ``"cosine"``: Nichol & Dhariwal (2021), alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008, betas
    clipped at 0.999; beta_start / beta_end are not used.
    """
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if schedule == "cosine":
        s = 0.008
        f = np.cos((np.arange(num_steps + 1, dtype=np.float64) / num_steps + s) / (1 + s) * math.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


@dataclass(frozen=True)
class SamplerPlan:
    """Everything a sampling loop needs, on one device.

    Attributes:
        timesteps: model evaluation timesteps, strictly decreasing, shape (n,), int64.
        coeffs: per-step update coefficients, shape (n, 8), float32; columns A, B, W_CUR, W_PREV, P, Q, R, S
            as documented at the top of this module.
        stochastic: whether the steps add fresh noise (S != 0 somewhere).
        multistep: whether a step reads the previous step's clean-sample estimate (W_PREV != 0 somewhere:
            dpmpp); ddpm and ddim steps do not, and may pass ``x0_prev=None`` to `denoise_step`.
    """

    timesteps: torch.Tensor
    coeffs: torch.Tensor
    stochastic: bool
    multistep: bool


def denoise_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    x0_prev: torch.Tensor | None,
    coeffs: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampler step (any sampler), pure tensor arithmetic with no host sync.

    Args:
        x: current sample x_{t_i}, shape (M, D), float32.
        eps: predicted noise at (x, t_i), shape (M, D).
        x0_prev: clean-sample estimate of the previous step (zeros at the first step), shape (M, D); None for a
            step whose W_PREV coefficient is 0 (every step of ddpm and ddim), which then reads no such tensor:
            the same result, since W_PREV * x0_prev adds exactly 0.
        coeffs: one row of ``SamplerPlan.coeffs``, shape (8,).
        noise: standard normal noise, shape (M, D), for stochastic plans; None for deterministic ones.

    Returns:
        (x_next, x0): the sample at the next timestep and this step's clean-sample estimate, both (M, D).
    """
    a, b, w_cur, w_prev, p, q, r, s = coeffs.unbind(0)
    x0 = a * x - b * eps
    d = w_cur * x0 if x0_prev is None else w_cur * x0 + w_prev * x0_prev
    x_next = p * x + q * d + r * eps
    if noise is not None:
        x_next = x_next + s * noise
    return x_next, x0


class GaussianDiffusion(nn.Module):
    """Discrete-time Gaussian diffusion with epsilon prediction.

    An nn.Module only to hold the schedule as (non-persistent) float32 buffers: move it with
    ``.to(device)`` next to the model. All coefficients are computed in float64 first.

    Args:
        num_steps: number of diffusion steps T (OFER: 1000).
        beta_start, beta_end: ends of the linear beta schedule (OFER: 1e-4, 1e-2).
        schedule: ``"linear"`` (OFER) or ``"cosine"``.
        loss: ``"l1"`` (OFER) or ``"mse"`` on the noise.
    """

    def __init__(
        self,
        *,
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 1e-2,
        schedule: str = "linear",
        loss: str = "l1",
        prior_skip: bool = False,
    ) -> None:
        super().__init__()
        # Ours, off by default (OFER's network predicts the noise directly). With prior_skip the network
        # predicts a residual on top of sqrt(1 - abar_t) * x_t, which is E[eps | x_t] exactly when x0 ~ N(0, I),
        # the distribution of FLAME's PCA coefficients: an untrained model then samples the FLAME prior, and
        # short trainings stay calibrated instead of amplifying the noise-prediction error by
        # 1/sqrt(abar_t) (12.5x at t=999 for OFER's schedule). See README, "Results".
        self.prior_skip = bool(prior_skip)
        if schedule not in SCHEDULES:
            raise ValueError(f"GaussianDiffusion: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if loss not in LOSSES:
            raise ValueError(f"GaussianDiffusion: loss must be one of {LOSSES}, got {loss!r}")
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"GaussianDiffusion: num_steps must be a positive integer, got {num_steps!r}")
        if schedule == "linear" and not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(
                f"GaussianDiffusion: need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, "
                f"beta_end={beta_end}"
            )
        self.num_steps = int(num_steps)
        self.schedule, self.loss_type = schedule, loss
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)

        betas = make_betas(schedule, self.num_steps, self.beta_start, self.beta_end)
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # float64 copies: sampler coefficients are derived from these, never from the float32 buffers.
        self._betas64, self._abar64 = betas, abar

        table = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": post_var,
            # beta~_0 = 0: log-variance clipped as in improved-diffusion.
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
        }
        for name, values in table.items():
            # Non-persistent: the schedule is rebuilt from the config, checkpoints stay free of it.
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)
        self._plans: dict[tuple, SamplerPlan] = {}

    def extra_repr(self) -> str:
        return (
            f"num_steps={self.num_steps}, schedule={self.schedule!r}, beta_start={self.beta_start}, "
            f"beta_end={self.beta_end}, loss={self.loss_type!r}, prior_skip={self.prior_skip}"
        )

    def predict_noise(self, model: NoisePredictor, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The noise prediction used everywhere (training, eager and graphed sampling): the model's output,
        plus sqrt(1 - abar_t) * x_t when ``prior_skip`` is on. Shapes: x (M, D), t (M,), cond (M, C)."""
        eps = model(x, t, cond)
        if self.prior_skip:
            eps = eps + self.sqrt_one_minus_alphas_cumprod[t].unsqueeze(-1).to(eps.dtype) * x.to(eps.dtype)
        return eps

    # ----------------------------------------------------------------------------------------- forward process
    def _coef(self, buffer: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if buffer.device != like.device:
            raise ValueError(
                f"GaussianDiffusion lives on {buffer.device} but the data is on {like.device}: "
                "call diffusion.to(device) once, next to model.to(device)"
            )
        return buffer[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I).

        Args:
            x0: clean data, shape (B, ...).
            t: timesteps, shape (B,), int64 in [0, num_steps).
            noise: standard normal noise, same shape as x0.

        Returns:
            x_t, same shape as x0.
        """
        return self._coef(self.sqrt_alphas_cumprod, t, x0) * x0 + self._coef(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Clean-sample estimate x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); shapes as ``q_sample``."""
        return self._coef(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._coef(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        ) * eps

    def training_losses(
        self,
        model: NoisePredictor,
        x0: torch.Tensor,
        cond: torch.Tensor,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample denoising loss (OFER: L1 between predicted and true noise, mean over D).

        Args:
            model: noise predictor, called as model(x_t (B, D), t (B,) int64, cond (B, C)).
            x0: clean parameters, shape (B, D).
            cond: conditioning, shape (B, C).
            t: timesteps (B,) int64; default uniform in [0, num_steps).
            noise: noise (B, D); default standard normal.
            generator: RNG for t and noise (must live on x0's device).

        Returns:
            ``{"loss": (B,) float32, "t": (B,) int64}``; average "loss" for the objective, bin it by "t" to log
            the loss per timestep quartile.
        """
        if x0.ndim != 2:
            raise ValueError(f"training_losses: x0 must have shape (B, D), got {tuple(x0.shape)}")
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_steps, (b,), device=x0.device, generator=generator)
        elif t.shape != (b,):
            raise ValueError(f"training_losses: t must have shape ({b},), got {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        elif noise.shape != x0.shape:
            raise ValueError(f"training_losses: noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        pred = self.predict_noise(model, self.q_sample(x0, t, noise), t, cond)
        err = pred.float() - noise.float()
        per_elem = err.abs() if self.loss_type == "l1" else err.square()
        return {"loss": per_elem.mean(dim=1), "t": t}

    # --------------------------------------------------------------------------------------------- sampling
    def timesteps(self, steps: int, timestep_spacing: str = "trailing") -> np.ndarray:
        """The ``steps`` evaluation timesteps of ddim / dpmpp, strictly decreasing, int64 (see module doc)."""
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        if int(steps) != steps or not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be an integer in [1, {self.num_steps}], got {steps!r}")
        steps, big_t = int(steps), self.num_steps
        if timestep_spacing == "trailing":
            ts = np.round(big_t * np.arange(steps, 0, -1, dtype=np.float64) / steps).astype(np.int64) - 1
        else:
            ts = np.arange(steps - 1, -1, -1, dtype=np.int64) * (big_t // steps)
        assert (np.diff(ts) < 0).all() and ts[-1] >= 0 and ts[0] < big_t, ts
        return ts

    def plan(
        self,
        sampler: str = "ddpm",
        *,
        steps: int | None = None,
        eta: float = 0.0,
        timestep_spacing: str = "trailing",
        device: torch.device | str = "cpu",
    ) -> SamplerPlan:
        """Timesteps and per-step coefficients of a sampler (cached per argument set and device).

        Building a plan copies it to the device once (a host sync); ``sample`` reuses the cached plan, so
        call this beforehand where even that first sync matters (CUDA graph capture).

        Args:
            sampler: one of ``SAMPLERS``.
            steps: number of model evaluations; ddpm uses all num_steps (None or num_steps); ddim / dpmpp
                default to num_steps.
            eta: DDIM stochasticity (0: deterministic DDIM, 1: DDPM-like posterior variance); ddim only.
            timestep_spacing: ``"trailing"`` or ``"leading"`` (ddim / dpmpp).
            device: where the plan's tensors live.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if sampler == "ddpm" and steps not in (None, self.num_steps):
            raise ValueError(
                f"sampler 'ddpm' runs all {self.num_steps} steps, got steps={steps}; "
                "for fewer steps use sampler='ddim' with eta=1.0"
            )
        if sampler != "ddim" and eta != 0.0:
            raise ValueError(f"eta only applies to sampler 'ddim', got eta={eta} with sampler {sampler!r}")
        if not 0.0 <= eta:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        steps = self.num_steps if steps is None else steps
        device = torch.empty(0, device=device).device  # canonical form: "cuda" -> "cuda:0"
        key = (sampler, steps, float(eta), timestep_spacing, str(device))
        if key not in self._plans:
            if sampler == "ddpm":
                ts = np.arange(self.num_steps - 1, -1, -1, dtype=np.int64)
                coeffs = self._ddpm_coeffs(ts)
            else:
                ts = self.timesteps(steps, timestep_spacing)
                coeffs = self._ddim_coeffs(ts, eta) if sampler == "ddim" else self._dpmpp_coeffs(ts)
            self._plans[key] = SamplerPlan(
                timesteps=torch.tensor(ts, dtype=torch.int64, device=device),
                coeffs=torch.tensor(coeffs, dtype=torch.float32, device=device),
                stochastic=bool((coeffs[:, S] != 0).any()),
                multistep=bool((coeffs[:, W_PREV] != 0).any()),
            )
        return self._plans[key]

    def _abar_next(self, ts: np.ndarray) -> np.ndarray:
        # alpha_bar of the timestep each step lands on; the last step lands on the clean sample (abar = 1).
        return np.append(self._abar64[ts[1:]], 1.0)

    def _base_coeffs(self, ts: np.ndarray) -> np.ndarray:
        c = np.zeros((len(ts), _NUM_COEFFS), dtype=np.float64)
        abar = self._abar64[ts]
        c[:, A] = np.sqrt(1.0 / abar)
        c[:, B] = np.sqrt(1.0 / abar - 1.0)
        c[:, W_CUR] = 1.0
        return c

    def _ddpm_coeffs(self, ts: np.ndarray) -> np.ndarray:
        # Posterior q(x_{t-1} | x_t, x0) at x0 = x0_hat: mean coef1 x0 + coef2 x_t, variance beta~_t.
        c = self._base_coeffs(ts)
        beta, abar, abar_next = self._betas64[ts], self._abar64[ts], self._abar_next(ts)
        c[:, P] = (1.0 - abar_next) * np.sqrt(1.0 - beta) / (1.0 - abar)
        c[:, Q] = beta * np.sqrt(abar_next) / (1.0 - abar)
        c[:, S] = np.sqrt(beta * (1.0 - abar_next) / (1.0 - abar))
        return c

    def _ddim_coeffs(self, ts: np.ndarray, eta: float) -> np.ndarray:
        # Song et al. (2021) eq. 12: x_next = sqrt(abar_n) x0 + sqrt(1 - abar_n - sigma^2) eps + sigma z,
        # sigma = eta sqrt((1 - abar_n) / (1 - abar_t)) sqrt(1 - abar_t / abar_n), with n the NEXT sampled step.
        c = self._base_coeffs(ts)
        abar, abar_next = self._abar64[ts], self._abar_next(ts)
        sigma = eta * np.sqrt((1.0 - abar_next) / (1.0 - abar) * (1.0 - abar / abar_next))
        c[:, Q] = np.sqrt(abar_next)
        c[:, R] = np.sqrt(np.maximum(1.0 - abar_next - sigma**2, 0.0))
        c[:, S] = sigma
        return c

    def _dpmpp_coeffs(self, ts: np.ndarray) -> np.ndarray:
        # DPM-Solver++(2M), Lu et al. (2022) Alg. 2, with alpha = sqrt(abar), sigma = sqrt(1 - abar),
        # lambda = log(alpha / sigma), h_i = lambda_next - lambda_i:
        #   x_next = (sigma_n / sigma_i) x + alpha_n (1 - e^{-h_i}) D_i,
        #   D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1},  r_i = h_{i-1} / h_i,
        # first order (D_i = x0_i) at the first step and at the last one, which lands on sigma = 0
        # (h = inf; diffusers' lower_order_final with final_sigmas_type="zero").
        c = self._base_coeffs(ts)
        abar, abar_next = self._abar64[ts], self._abar_next(ts)
        alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
        alpha_n, sigma_n = np.sqrt(abar_next), np.sqrt(1.0 - abar_next)
        c[:, P] = sigma_n / sigma
        c[:, Q] = alpha_n - alpha * sigma_n / sigma  # = alpha_n (1 - e^{-h})
        n = len(ts)
        if n > 2:
            lam = np.log(alpha) - np.log(sigma)  # lambda at ts; the last step (to sigma = 0) needs none
            h = lam[2:] - lam[1:-1]  # h_i for i = 1..n-2
            h_prev = lam[1:-1] - lam[:-2]  # h_{i-1}
            r = h_prev / h
            c[1:-1, W_CUR] = 1.0 + 0.5 / r
            c[1:-1, W_PREV] = -0.5 / r
        return c

    @torch.no_grad()
    def sample(
        self,
        model: NoisePredictor,
        cond: torch.Tensor,
        *,
        dim: int,
        num_samples: int = 1,
        sampler: str = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        timestep_spacing: str = "trailing",
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw ``num_samples`` parameter vectors per conditioning vector.

        The model is called as model(x (M, dim), t (M,) int64, cond (M, C)), M = B * num_samples, with cond
        repeated by ``repeat_interleave``: rows [b * num_samples, (b + 1) * num_samples) belong to cond[b].
        No clipping (OFER does not clip). Runs under no_grad; put the model in eval mode yourself.

        Args:
            model: noise predictor.
            cond: conditioning, shape (B, C); samples are created on its device.
            dim: size D of the sampled vectors.
            num_samples: samples per conditioning vector N.
            sampler: ``"ddpm"``, ``"ddim"`` or ``"dpmpp"``.
            steps, eta, timestep_spacing: see ``plan``.
            generator: RNG for x_T and the per-step noise (must live on cond's device).
            x_T: starting noise, shape (B, N, dim); default standard normal.

        Returns:
            samples, shape (B, N, dim), float32.
        """
        if cond.ndim != 2:
            raise ValueError(f"sample: cond must have shape (B, C), got {tuple(cond.shape)}")
        if num_samples < 1:
            raise ValueError(f"sample: num_samples must be >= 1, got {num_samples}")
        device = cond.device
        plan = self.plan(sampler, steps=steps, eta=eta, timestep_spacing=timestep_spacing, device=device)
        b = cond.shape[0]
        m = b * num_samples
        cond_rep = cond.repeat_interleave(num_samples, dim=0)  # (M, C)
        if x_T is None:
            x = torch.randn((m, dim), device=device, dtype=torch.float32, generator=generator)
        else:
            if x_T.shape != (b, num_samples, dim):
                raise ValueError(f"sample: x_T must have shape ({b}, {num_samples}, {dim}), got {tuple(x_T.shape)}")
            x = x_T.to(device=device, dtype=torch.float32).reshape(m, dim)
        x0_prev = torch.zeros_like(x)
        for i in range(plan.timesteps.shape[0]):
            eps = self.predict_noise(model, x, plan.timesteps[i].expand(m), cond_rep).to(torch.float32)
            noise = None
            if plan.stochastic:
                noise = torch.randn((m, dim), device=device, dtype=torch.float32, generator=generator)
            x, x0_prev = denoise_step(x, eps, x0_prev, plan.coeffs[i], noise)
        return x.view(b, num_samples, dim)

"""Multistep exponential integrators in log-sigma time: DPM-Solver++(2M)/(3M) and UniPC.

Same signature and NFE accounting as :mod:`lightning_dpmot.sampling.samplers` (one denoiser call per step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from lightning_dpmot.diffusion.conditioning import Cond
from lightning_dpmot.diffusion.denoiser import Denoiser
from lightning_dpmot.sampling.samplers import NoiseSource, SampleResult, StepCallback, _denoise, _emit, _setup

# --- Multistep exponential integrators in log-sigma time (DPM-Solver++, UniPC) ---------------------------------
#
# With lambda = -log(sigma), the probability-flow ODE dx/dsigma = (x - D) / sigma has the exact solution
#     x(sigma_t) = (sigma_t / sigma_s) x(sigma_s) + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda D dlambda
# (DPM-Solver++'s data-prediction form with alpha = 1). With h = lambda_t - lambda_s and D held at D_s this is
#     x_t = (sigma_t / sigma_s) x_s - (e^{-h} - 1) D_s                                  (DDIM, first order);
# the multistep solvers integrate the polynomial through the last denoised values instead. The step to sigma = 0
# (h = infinity) is x = D(x, sigma) as in k-diffusion. Step i of N has order min(order, i + 1, N - i): lower order
# while the history fills up and at the final steps (the step to 0 is first order anyway).


def _multistep_order(order: int, i: int, num_steps: int) -> int:
    """Order of step i of N: warm-up (only i + 1 denoised values exist) and lower order at the final steps."""
    return min(order, i + 1, num_steps - i)


def dpmpp_multistep_step(
    x: Tensor, sigma: Tensor, sigma_next: Tensor, lambdas: list[Tensor], Ds: list[Tensor]
) -> Tensor:
    """One DPM-Solver++ multistep update (Lu et al. 2022) from ``sigma`` to ``sigma_next > 0`` in EDM's sigma space.

    ``lambdas``/``Ds``: the last k in {1, 2, 3} log-levels -log(sigma_j) and denoised values (B, *S), newest last,
    ``lambdas[-1] = -log(sigma)``; the order is k. With D(lambda) ~ D_0 + u D1 / h + u^2 D2 / h^2 (u = lambda -
    lambda_0; D1, D2 from divided differences) the integral gives, with phi_1 = e^{-h} - 1,
    phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2:
        x_t = (sigma_t / sigma_s) x - phi_1 D_0 + phi_2 D1 - 2 phi_3 D2,
    the exact integral of the interpolating quadratic (order 3). DPM-Solver's ``multistep_dpm_solver_third_update``,
    k-diffusion's ``sample_dpmpp_3m_sde`` and diffusers weight D2 by -phi_3, half of that; with it the method
    converges with order 2 only (tests/sampling/test_multistep_solvers.py measures both).
    """
    h = -sigma_next.log() - lambdas[-1]
    phi_1 = torch.expm1(-h)
    x_next = (sigma_next / sigma) * x - phi_1 * Ds[-1]
    if len(Ds) == 1:
        return x_next
    phi_2 = phi_1 / h + 1
    r0 = (lambdas[-1] - lambdas[-2]) / h
    D1_0 = (Ds[-1] - Ds[-2]) / r0  # ~ h D'(lambda_0) - (h h_0 / 2) D''
    if len(Ds) == 2:
        return x_next + phi_2 * D1_0
    phi_3 = phi_2 / h - 0.5
    r1 = (lambdas[-2] - lambdas[-3]) / h
    D1_1 = (Ds[-2] - Ds[-3]) / r1
    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)  # h D'(lambda_0) + O(h^3)
    D2 = (D1_0 - D1_1) / (r0 + r1)  # h^2 D''(lambda_0) / 2 + O(h^3)
    return x_next + phi_2 * D1 - 2 * phi_3 * D2


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond | None = None,
    generator: torch.Generator | NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in k-diffusion's form. NFE = N.

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - (e^{-h} - 1) ((1 + 1 / (2r)) D_i - D_{i-1} / (2r)) with
    h = lambda_{i+1} - lambda_i, r = h_{i-1} / h; first order at the first step, x = D_i at the step to 0.
    """
    D, x, sigmas = _setup(denoiser, x, sigmas)
    old_denoised: Tensor | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(D, x, sigma, cond)
        x_in = x
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            D_eff = denoised
            if old_denoised is not None:
                r = (sigmas[i - 1].log() - sigma.log()) / h
                D_eff = (1 + 1 / (2 * r)) * denoised - old_denoised / (2 * r)
            x = (sigma_next / sigma) * x - torch.expm1(-h) * D_eff
        old_denoised = denoised
        _emit(callback, i, x_in, x, sigma, sigma_next, denoised)
    return SampleResult(x, D.nfe)


@torch.no_grad()
def sample_dpmpp_3m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond | None = None,
    generator: torch.Generator | NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> SampleResult:
    """Deterministic DPM-Solver++(3M) (third-order multistep, data prediction; :func:`dpmpp_multistep_step`).

    NFE = N. Step i has order min(3, i + 1, N - i); x = D_i at the step to 0.
    """
    D, x, sigmas = _setup(denoiser, x, sigmas)
    N = len(sigmas) - 1
    lambdas: list[Tensor] = []
    Ds: list[Tensor] = []
    for i in range(N):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(D, x, sigma, cond)
        lambdas, Ds = [*lambdas[-2:], -sigma.log()], [*Ds[-2:], denoised]
        x_in = x
        if sigma_next == 0:
            x = denoised
        else:
            k = _multistep_order(3, i, N)
            x = dpmpp_multistep_step(x, sigma, sigma_next, lambdas[-k:], Ds[-k:])
        _emit(callback, i, x_in, x, sigma, sigma_next, denoised)
    return SampleResult(x, D.nfe)


UniPCVariant = Literal["bh1", "bh2"]


def unipc_coefficients(h: Tensor, rks: Tensor, variant: UniPCVariant) -> tuple[Tensor, Tensor, Tensor]:
    """UniPC's B(h), order-condition matrix R and right-hand side b in data prediction (Zhao et al. 2023).

    ``rks`` (K,): r_m = (lambda_{i-m} - lambda_i) / h for the K - 1 earlier points, then 1 for the new point.
    B(h) = -h ("bh1") or e^{-h} - 1 ("bh2"); R[k, m] = r_m^k and b_k = (k + 1)! (-h) phi_{k+2}(-h) / B(h) for
    k = 0..K-1, with phi_1(z) = (e^z - 1) / z and phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z.
    """
    hh = -h
    B_h = hh if variant == "bh1" else torch.expm1(hh)
    h_phi_k = torch.expm1(hh) / hh - 1  # hh * phi_2(hh)
    factorial = 1
    b = []
    for k in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.stack([rks**k for k in range(len(rks))])
    return B_h, R, torch.stack(b)


def unipc_step(
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    lambdas: list[Tensor],
    Ds: list[Tensor],
    variant: UniPCVariant,
    denoise_next: Callable[[Tensor], Tensor],
    correct: bool = True,
) -> tuple[Tensor, Tensor]:
    """UniP-p predictor, one evaluation ``denoise_next(x_pred)`` at ``sigma_next``, then (if ``correct``) UniC.

    ``lambdas``/``Ds``: the last p log-levels and denoised values, newest last (p = len(Ds), the order).
    Predictor: x_pred = x_ - B(h) sum_m rho^p_m D1_m with x_ = (sigma_t / sigma_s) x - (e^{-h} - 1) D_0 and
    D1_m = (D_{i-m} - D_0) / r_m; corrector: x_c = x_ - B(h) (sum_m rho^c_m D1_m + rho^c_p (D_t - D_0)), with D_t the
    denoised value at (x_pred, sigma_next), which the next step reuses. rho solves R rho = b (rho = 1/2 for one
    unknown, as in the reference implementation). Returns (x at sigma_next, D_t).
    """
    h = -sigma_next.log() - lambdas[-1]
    D_0 = Ds[-1]
    rks = [(lam - lambdas[-1]) / h for lam in reversed(lambdas[:-1])]
    D1s = [(D_m - D_0) / r for D_m, r in zip(reversed(Ds[:-1]), rks)]
    B_h, R, b = unipc_coefficients(h, torch.stack([*rks, h.new_ones(())]), variant)
    x_ = (sigma_next / sigma) * x - torch.expm1(-h) * D_0
    x_pred = x_
    if D1s:
        rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1]) if len(D1s) > 1 else h.new_full((1,), 0.5)
        x_pred = x_ - B_h * sum(rho * D1 for rho, D1 in zip(rhos_p, D1s))
    D_t = denoise_next(x_pred)
    if not correct:
        return x_pred, D_t
    rhos_c = torch.linalg.solve(R, b) if D1s else h.new_full((1,), 0.5)
    corr = sum((rho * D1 for rho, D1 in zip(rhos_c[:-1], D1s)), torch.zeros_like(x))
    return x_ - B_h * (corr + rhos_c[-1] * (D_t - D_0)), D_t


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond | None = None,
    generator: torch.Generator | NoiseSource | None = None,
    callback: StepCallback | None = None,
    order: int = 2,
    variant: UniPCVariant = "bh2",
) -> SampleResult:
    """UniPC (Zhao et al. 2023): UniP-p predictor + UniC corrector, data prediction, B(h) per ``variant``. NFE = N.

    Step i (to sigma_{i+1} > 0) predicts with order p = min(order, i + 1, N - i), evaluates D once at the predicted
    point and corrects with it (UniC-p, order p + 1); the next step reuses that evaluation, so the corrector costs no
    NFE. No corrector at the last level before 0: its evaluation is the final step x = D(x_pred, sigma_{N-1}).
    The callback's ``denoised`` for step i is D at the predicted state at sigma_i.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    D, x, sigmas = _setup(denoiser, x, sigmas)
    N = len(sigmas) - 1
    denoised = _denoise(D, x, sigmas[0], cond)
    lambdas: list[Tensor] = []
    Ds: list[Tensor] = []
    for i in range(N):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        lambdas, Ds = [*lambdas[-2:], -sigma.log()], [*Ds[-2:], denoised]
        x_in = x
        if sigma_next == 0:
            x = denoised
        else:
            p = _multistep_order(order, i, N)
            x, denoised = unipc_step(
                x,
                sigma,
                sigma_next,
                lambdas[-p:],
                Ds[-p:],
                variant,
                lambda x_pred: _denoise(D, x_pred, sigma_next, cond),  # noqa: B023 (called at once)
                correct=bool(sigmas[i + 2] > 0),  # no corrector before the final step x = D(x_pred)
            )
        _emit(callback, i, x_in, x, sigma, sigma_next, Ds[-1])
    return SampleResult(x, D.nfe)

"""Linear multistep samplers in sigma time: iPNDM (Zhang & Chen 2023, "improved PNDM" of the DEIS paper) and its
variable-step form.

On EDM's probability-flow ODE ``dx/dsigma = d(x, sigma) = (x - D(x; sigma)) / sigma`` iPNDM takes explicit
Adams-Bashforth steps through the last k slopes, with the constant-step coefficients and a lower-order warm-up:

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * sum_j b^(k)_j d_{i-j},    k = min(order, i + 1)
    b^(1) = [1],  b^(2) = [3, -1] / 2,  b^(3) = [23, -16, 5] / 12,  b^(4) = [55, -59, 37, -9] / 24.

One network call per step (NFE = N), the last step to sigma = 0 included. The coefficients assume equal steps:
on a uniform grid the method has order ``order``; on EDM's rho-schedule the steps change smoothly and the
global order drops to 2 (the AB weights then integrate d(sigma(u)) sigma'(u) only to O(du^3) per step), which is
still more accurate than Heun at equal NFE on few steps (tests/sampling/test_ipndm.py measures both).

``ipndm_v`` uses the Adams-Bashforth weights of the actual, uneven grid instead,

    b_j = (1 / h_i) * integral_{sigma_i}^{sigma_{i+1}} l_j(s) ds,    l_j: Lagrange basis on sigma_i, ..., sigma_{i-k+1},

which restores order ``order`` on any schedule (equal steps give back the constants above).
"""

from __future__ import annotations

import numpy
import torch
from torch import Tensor

from lightning_dpmot.diffusion.conditioning import Cond
from lightning_dpmot.diffusion.denoiser import Denoiser
from lightning_dpmot.sampling.samplers import NoiseSource, SampleResult, StepCallback, _denoise, _emit, _setup

#: Adams-Bashforth coefficients b^(k), newest slope first.
AB_COEFFICIENTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def adams_bashforth_slope(slopes: list[Tensor]) -> Tensor:
    """The AB combination sum_j b^(k)_j d_{i-j} of the last k = len(slopes) slopes (B, *S), newest last."""
    coefficients = AB_COEFFICIENTS[len(slopes)]
    return sum(b * d for b, d in zip(coefficients, reversed(slopes)))  # type: ignore[return-value]


def variable_step_weights(nodes: Tensor, sigma_next: Tensor) -> Tensor:
    """AB weights (k,) for slopes at ``nodes`` (k,) = (sigma_i, sigma_{i-1}, ...) over the step sigma_i -> sigma_next.

    Integrates each Lagrange basis polynomial exactly with k-point Gauss-Legendre quadrature (degree k - 1 < 2k).
    """
    k = len(nodes)
    points, weights = (torch.from_numpy(a).to(nodes) for a in numpy.polynomial.legendre.leggauss(k))
    a, b = nodes[0], sigma_next
    s = (b - a) / 2 * points + (a + b) / 2  # quadrature points on [sigma_next, sigma_i]
    basis = torch.ones(k, k, dtype=nodes.dtype, device=nodes.device)  # basis[j, q] = l_j(s_q)
    for j in range(k):
        for m in range(k):
            if m != j:
                basis[j] = basis[j] * (s - nodes[m]) / (nodes[j] - nodes[m])
    return (basis * weights).sum(dim=1) / 2  # (1 / h) * (h / 2) * sum_q w_q l_j(s_q)


@torch.no_grad()
def sample_ipndm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond | None = None,
    generator: torch.Generator | NoiseSource | None = None,
    callback: StepCallback | None = None,
    order: int = 4,
    variable_step: bool = False,
) -> SampleResult:
    """iPNDM: Adams-Bashforth of order min(order, i + 1) at step i on dx/dsigma = (x - D) / sigma. NFE = N.

    ``variable_step``: the weights of the uneven grid (:func:`variable_step_weights`, "ipndm_v") instead of the
    constant-step ones.
    """
    if order not in AB_COEFFICIENTS:
        raise ValueError(f"iPNDM order must be 1, 2, 3 or 4, got {order}")
    D, x, sigmas = _setup(denoiser, x, sigmas)
    slopes: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(D, x, sigma, cond)
        slopes = [*slopes[max(len(slopes) - order + 1, 0) :], (x - denoised) / sigma]
        if variable_step:
            nodes = sigmas[max(i - len(slopes) + 1, 0) : i + 1].flip(0)  # sigma_i, sigma_{i-1}, ...
            w = variable_step_weights(nodes, sigma_next)
            slope = sum(w_j * d for w_j, d in zip(w, reversed(slopes)))
        else:
            slope = adams_bashforth_slope(slopes)
        x_in, x = x, x + (sigma_next - sigma) * slope
        _emit(callback, i, x_in, x, sigma, sigma_next, denoised)
    return SampleResult(x, D.nfe)

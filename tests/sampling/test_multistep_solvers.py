"""DPM-Solver++(2M)/(3M) and UniPC: convergence order on Gaussian data with a closed-form PF-ODE solution, the 3M
step against quadrature of the interpolating polynomial, 2M against DPM-Solver++'s VP-space formula, NFE and cond
pass-through, determinism and image-shaped batches."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from lightning_dpmot.sampling import (
    SAMPLER_NAMES,
    SamplerSpec,
    dpmpp_multistep_step,
    karras_sigmas,
    run_sampler,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_euler,
    sample_heun,
    sample_unipc,
)

MU = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)  # data ~ N(MU, S^2 I), d = 4
S = 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0

MULTISTEP = {
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    **{f"unipc{p}_{v}": partial(sample_unipc, order=p, variant=v) for p in (1, 2, 3) for v in ("bh1", "bh2")},
}


def gaussian_D(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
    """Exact denoiser of N(MU, S^2 I): D = MU + S^2 / (S^2 + sigma^2) (x - MU); x (B, 4), sigma (B,)."""
    return MU + S**2 / (S**2 + sigma.reshape(-1, 1) ** 2) * (x - MU)


def pf_ode_solution(x_T: torch.Tensor, sigma_T: float, sigma: float) -> torch.Tensor:
    """x(sigma) = MU + sqrt((S^2 + sigma^2) / (S^2 + sigma_T^2)) (x(sigma_T) - MU)."""
    return MU + math.sqrt((S**2 + sigma**2) / (S**2 + sigma_T**2)) * (x_T - MU)


def final_error(sampler, num_steps: int) -> float:
    """Max error after N steps on EDM's schedule (80 -> 0.002, rho = 7, then 0). The step to 0 is x = D(x, sigma_min)
    for every sampler, so the reference is D at the exact solution at sigma_min."""
    sigmas = karras_sigmas(num_steps, SIGMA_MIN, SIGMA_MAX)
    x_T = MU + SIGMA_MAX * torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = gaussian_D(pf_ode_solution(x_T, SIGMA_MAX, float(sigmas[-2])), sigmas[-2].expand(3))
    return (sampler(gaussian_D, x_T, sigmas).x - exact).abs().max().item()


@pytest.mark.parametrize(
    "name,lo,hi",
    [
        ("dpmpp_2m", 3.0, 5.5),  # order 2: ratio -> 4
        ("dpmpp_3m", 6.0, 12.0),  # order 3: ratio -> 8
        ("unipc1_bh1", 3.0, 5.5),  # UniP-1 + UniC: order 2
        ("unipc1_bh2", 3.0, 5.5),
        ("unipc2_bh1", 6.0, 12.0),  # UniP-2 + UniC: order 3
        ("unipc2_bh2", 6.0, 12.0),
        ("unipc3_bh1", 12.0, 24.0),  # UniP-3 + UniC: order 4
        ("unipc3_bh2", 12.0, 24.0),
    ],
)
def test_global_order_on_gaussian_data(name: str, lo: float, hi: float) -> None:
    errors = [final_error(MULTISTEP[name], n) for n in (40, 80, 160)]
    for coarse, fine in zip(errors, errors[1:]):
        assert lo < coarse / fine < hi, errors


def test_more_accurate_than_euler_and_heun_at_equal_nfe() -> None:
    """At 20 NFE on EDM's schedule (Heun: 10 steps = 19 NFE, 11 steps = 21 NFE)."""
    baseline = min(final_error(sample_euler, 20), final_error(sample_heun, 10), final_error(sample_heun, 11))
    for name in ("dpmpp_2m", "dpmpp_3m", "unipc2_bh2", "unipc3_bh1", "unipc3_bh2"):
        assert final_error(MULTISTEP[name], 20) < baseline / 2.5, name


def test_3m_step_integrates_the_interpolating_quadratic() -> None:
    """x_t = (sigma_t / sigma_s) x + sigma_t int e^lambda p(lambda) dlambda with p the quadratic through the three
    (lambda_j, D_j): compared with Gauss-Legendre quadrature of the Lagrange form, on uneven steps."""
    sigmas = torch.tensor([7.0, 2.5, 1.1, 0.3], dtype=torch.float64)
    lam = -sigmas.log()
    Ds = [torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    x = torch.randn(2, 3, dtype=torch.float64)
    nodes, weights = (torch.from_numpy(a) for a in __import__("numpy").polynomial.legendre.leggauss(20))
    a, b = lam[2], lam[3]
    u = (b - a) / 2 * nodes + (a + b) / 2

    def lagrange(j: int, t: torch.Tensor) -> torch.Tensor:
        others = [k for k in range(3) if k != j]
        return math.prod((t - lam[k]) / (lam[j] - lam[k]) for k in others)

    integral = sum(((b - a) / 2 * weights * u.exp() * lagrange(j, u)).sum() * Ds[j] for j in range(3))
    expected = sigmas[3] / sigmas[2] * x + sigmas[3] * integral
    got = dpmpp_multistep_step(x, sigmas[2], sigmas[3], list(lam[:3]), Ds)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_dpmpp_2m_equals_vp_space_dpm_solver_pp() -> None:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) written in VP coordinates: alpha = 1 / sqrt(1 + sigma^2),
    sigma_vp = alpha sigma, x_vp = alpha x, lambda = log(alpha / sigma_vp), x_theta(x_vp, t) = D(x_vp / alpha, sigma):
        x_i = (sigma_vp_i / sigma_vp_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i,
        D_i = (1 + 1 / (2 r_i)) x_theta(t_{i-1}) - x_theta(t_{i-2}) / (2 r_i), r_i = h_{i-1} / h_i
    (D_i = x_theta(t_{i-1}) at the first step). Every state agrees with the sigma-space sampler."""

    def D(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:  # nonlinear, sigma-dependent
        return torch.tanh(x) * (1 + 0.3 * torch.sin(sigma.reshape(-1, 1)))

    sigmas = torch.tensor([14.0, 6.0, 2.0, 0.9, 0.2, 0.05, 0.0], dtype=torch.float64)
    x_T = 14.0 * torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    states: list[torch.Tensor] = []
    sample_dpmpp_2m(D, x_T, sigmas, callback=lambda info: states.append(info["x"]))

    alpha = 1 / (1 + sigmas[:-1] ** 2).sqrt()
    sigma_vp = alpha * sigmas[:-1]
    lam = (alpha / sigma_vp).log()
    x_vp = alpha[0] * x_T
    x_theta = [D(x_vp / alpha[0], sigmas[0].expand(2))]
    for i in range(1, len(sigmas) - 1):  # t_1 .. t_{M}: the levels above 0
        h = lam[i] - lam[i - 1]
        if i == 1:
            D_i = x_theta[-1]
        else:
            r = (lam[i - 1] - lam[i - 2]) / h
            D_i = (1 + 1 / (2 * r)) * x_theta[-1] - x_theta[-2] / (2 * r)
        x_vp = sigma_vp[i] / sigma_vp[i - 1] * x_vp - alpha[i] * torch.expm1(-h) * D_i
        assert torch.allclose(states[i - 1], x_vp / alpha[i], rtol=1e-13, atol=1e-13), i
        x_theta.append(D(x_vp / alpha[i], sigmas[i].expand(2)))
    assert torch.allclose(states[-1], x_theta[-1], rtol=1e-13, atol=1e-13)  # at sigma_vp = 0: x = x_theta


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc"])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 12])
def test_nfe_equals_num_steps_and_cond_passes_through(name: str, num_steps: int) -> None:
    cond = {"label": torch.tensor([3, 1])}
    seen = []

    def spy(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        seen.append(cond)
        assert sigma.shape == (2,) and bool((sigma > 0).all())
        return gaussian_D(x, sigma)

    spec = SamplerSpec(name, num_steps, order=3)  # type: ignore[arg-type]
    x = MU + SIGMA_MAX * torch.randn(2, 4, dtype=torch.float64)
    result = run_sampler(spec, spy, x, karras_sigmas(num_steps), cond=cond)
    assert result.nfe == spec.nfe == num_steps == len(seen)
    assert all(c is cond for c in seen)
    assert torch.isfinite(result.x).all()


def test_spec_names_options_and_tags() -> None:
    assert {"dpmpp_2m", "dpmpp_3m", "unipc"} <= set(SAMPLER_NAMES)
    assert SamplerSpec.from_nfe("unipc", 10).num_steps == 10
    assert SamplerSpec("unipc", order=3, variant="bh1").tag == "unipc3-bh1-karras-rho7"
    assert SamplerSpec("dpmpp_3m").tag == "dpmpp_3m-karras-rho7"
    with pytest.raises(ValueError, match="order"):
        SamplerSpec("unipc", order=4)
    with pytest.raises(ValueError, match="variant"):
        SamplerSpec("unipc", variant="bh3")  # type: ignore[arg-type]
    x, sigmas = MU + 10 * torch.randn(2, 4, dtype=torch.float64), karras_sigmas(8, sigma_max=10.0)
    for order, variant in ((1, "bh1"), (3, "bh2")):
        via_spec = run_sampler(SamplerSpec("unipc", 8, order=order, variant=variant), gaussian_D, x, sigmas).x
        assert torch.equal(via_spec, sample_unipc(gaussian_D, x, sigmas, order=order, variant=variant).x)


class PixelNet(torch.nn.Module):
    """A small nonlinear image denoiser in float32 (B, C, H, W) -> (B, C, H, W), acting on each sample alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        c_in = 1 / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()
        return torch.tanh(self.conv((x * c_in).float()))


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_deterministic_and_batch_shapes(name: str) -> None:
    torch.manual_seed(0)
    net = PixelNet()
    spec = SamplerSpec(name, 6, order=3)  # type: ignore[arg-type]
    sigmas = karras_sigmas(6)
    x = 80.0 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a = run_sampler(spec, net, x, sigmas).x
    b = run_sampler(spec, net, x.clone(), sigmas).x
    assert a.shape == (4, 3, 8, 8) and a.dtype == torch.float64
    assert torch.equal(a, b)  # same input -> bit-identical output
    alone = torch.cat([run_sampler(spec, net, x[i : i + 1], sigmas).x for i in range(4)])
    assert torch.allclose(a, alone, atol=1e-5)  # each sample is solved on its own


def test_reference_codes_half_weight_on_d2_is_only_second_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """DPM-Solver / k-diffusion / diffusers weight D2 by -phi_3 instead of -2 phi_3: the ratio falls to ~4."""
    import lightning_dpmot.sampling.multistep as samplers

    def half_weight_step(x, sigma, sigma_next, lambdas, Ds):
        full = dpmpp_multistep_step(x, sigma, sigma_next, lambdas, Ds)
        if len(Ds) < 3:
            return full
        h = -sigma_next.log() - lambdas[-1]
        phi_3 = (torch.expm1(-h) / h + 1) / h - 0.5
        r0, r1 = (lambdas[-1] - lambdas[-2]) / h, (lambdas[-2] - lambdas[-3]) / h
        D2 = ((Ds[-1] - Ds[-2]) / r0 - (Ds[-2] - Ds[-3]) / r1) / (r0 + r1)
        return full + phi_3 * D2  # -2 phi_3 D2 + phi_3 D2 = -phi_3 D2

    monkeypatch.setattr(samplers, "dpmpp_multistep_step", half_weight_step)
    errors = [final_error(sample_dpmpp_3m, n) for n in (80, 160, 320)]
    assert all(2.5 < coarse / fine < 4.5 for coarse, fine in zip(errors, errors[1:])), errors

"""Samplers: convergence order on an ODE with a known solution, exact NFE counts, DDIM/DDPM equivalences."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dpmot.diffusion import CFGDenoiser, GuidanceSpec, VPEpsDenoiser, VPSchedule
from lightning_dpmot.sampling import (
    SamplerSpec,
    ancestral_step,
    karras_sigmas,
    run_sampler,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_heun_stochastic,
)

S_DATA = 1.0


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
    """Exact denoiser for data ~ N(0, S_DATA^2 I): D = s^2 / (s^2 + sigma^2) x. The PF-ODE is linear."""
    return S_DATA**2 / (S_DATA**2 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2) * x


def exact_solution(x0: torch.Tensor, sigma0: float) -> torch.Tensor:
    """x(sigma) = x0 sqrt((s^2 + sigma^2) / (s^2 + sigma0^2)); at sigma = 0."""
    return x0 * S_DATA / math.sqrt(S_DATA**2 + sigma0**2)


def uniform_sigmas(n: int, hi: float = 10.0, lo: float = 1e-3) -> torch.Tensor:
    return torch.cat([torch.linspace(hi, lo, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def global_errors(sampler, ns: list[int]) -> list[float]:
    x0 = torch.ones(1, 1, dtype=torch.float64)
    return [
        abs(sampler(gaussian_denoiser, x0.clone(), uniform_sigmas(n)).x - exact_solution(x0, 10.0)).item() for n in ns
    ]


def test_heun_is_second_order_and_euler_first_order() -> None:
    ns = [8, 16, 32, 64]
    heun, euler = global_errors(sample_heun, ns), global_errors(sample_euler, ns)
    for a, b in zip(heun, heun[1:]):
        assert 3.2 < a / b < 4.8, heun  # halving the step divides the error by ~4
    for a, b in zip(euler, euler[1:]):
        assert 1.7 < a / b < 2.3, euler  # ... and by ~2 for Euler
    assert heun[-1] < euler[-1] / 10


@pytest.mark.parametrize(
    "sampler,n,nfe",
    [
        (sample_heun, 18, 35),
        (sample_heun, 1, 1),
        (sample_euler, 10, 10),
        (sample_heun_stochastic, 18, 35),
        (sample_euler_ancestral, 7, 7),
    ],
)
def test_nfe_counts(sampler, n: int, nfe: int) -> None:
    calls = []

    def D(x, sigma, cond=None):
        calls.append(1)
        return gaussian_denoiser(x, sigma)

    result = sampler(D, torch.randn(3, 2), karras_sigmas(n))
    assert result.nfe == nfe == len(calls)


def test_spec_nfe_and_from_nfe() -> None:
    assert SamplerSpec("heun", 18).nfe == 35
    assert SamplerSpec.from_nfe("heun", 27).num_steps == 14
    assert SamplerSpec.from_nfe("ddim", 10).num_steps == 10
    with pytest.raises(ValueError, match="odd"):
        SamplerSpec.from_nfe("heun", 10)
    with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
        SamplerSpec("rk4")  # type: ignore[arg-type]


def test_stochastic_without_churn_equals_heun() -> None:
    x = torch.randn(4, 3)
    sig = karras_sigmas(6)
    a = sample_heun(gaussian_denoiser, x.clone(), sig).x
    b = sample_heun_stochastic(gaussian_denoiser, x.clone(), sig, S_churn=0.0).x
    assert torch.equal(a, b)


def test_stochastic_churn_adds_noise_reproducibly() -> None:
    x = torch.randn(4, 3)
    sig = karras_sigmas(6)
    runs = [
        sample_heun_stochastic(
            gaussian_denoiser, x.clone(), sig, S_churn=40, generator=torch.Generator().manual_seed(s)
        ).x
        for s in (1, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_ancestral_step_splits_variance() -> None:
    sigma, sigma_next = torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.2, dtype=torch.float64)
    for eta in (0.0, 0.5, 1.0):
        down, up = ancestral_step(sigma, sigma_next, eta)
        assert (down**2 + up**2).item() == pytest.approx(sigma_next.item() ** 2)
    assert ancestral_step(sigma, sigma_next, 0.0)[1].item() == 0.0


def test_ddim_eta0_equals_euler() -> None:
    x, sig = torch.randn(5, 4), karras_sigmas(9)
    a = sample_euler(gaussian_denoiser, x.clone(), sig).x
    b = sample_euler_ancestral(gaussian_denoiser, x.clone(), sig, eta=0.0).x
    assert torch.allclose(a, b, atol=1e-12)


class FixedEps(torch.nn.Module):
    """A deterministic 'epsilon network' so that VP-space DDIM can be computed by hand."""

    def forward(self, x, t, cond=None):
        return torch.tanh(x + 0.01 * t.reshape(-1, 1))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sigma_space_ddim_equals_vp_space_ddim(eta: float) -> None:
    """One DDIM step (Song et al. 2021, Eq. 12) in VP coordinates equals our sampler in sigma space."""
    sched = VPSchedule("linear")
    net = FixedEps()
    D = VPEpsDenoiser(net, sched)
    t, t_prev = 600, 300
    a, a_prev = sched.alphas_cumprod[t].double(), sched.alphas_cumprod[t_prev].double()
    x_vp = torch.randn(3, 4, dtype=torch.float64)
    z = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    eps = net(x_vp.float(), torch.full((3,), float(t))).double()
    x0 = (x_vp - (1 - a).sqrt() * eps) / a.sqrt()
    s = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    expected_vp = a_prev.sqrt() * x0 + (1 - a_prev - s**2).sqrt() * eps + s * z
    sigmas = torch.stack([sched.sigmas[t], sched.sigmas[t_prev], torch.tensor(0.0)]).double()
    seen = []
    out = sample_euler_ancestral(
        D, x_vp / a.sqrt(), sigmas, eta=eta, generator=_Replay(z), callback=lambda info: seen.append(info["x"].clone())
    )
    assert torch.allclose(seen[0] * a_prev.sqrt(), expected_vp, atol=1e-5)
    assert out.nfe == 2


class _Replay:
    """Hands out a fixed noise tensor (so the test controls the ancestral noise)."""

    def __init__(self, z: torch.Tensor) -> None:
        self.z = z

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.z.to(x)


def test_vp_sigma_to_t_inverts_the_schedule() -> None:
    sched = VPSchedule("cosine")
    t = torch.tensor([0, 1, 250, 999])
    assert torch.allclose(sched.sigma_to_t(sched.sigmas[t]), t.float(), atol=1e-3)
    mid = (sched.log_sigmas[10] + sched.log_sigmas[11]) / 2
    assert sched.sigma_to_t(mid.exp().reshape(1)).item() == pytest.approx(10.5, abs=1e-3)


def test_vp_eps_denoiser_recovers_data_with_oracle_eps() -> None:
    sched = VPSchedule("linear")
    y, n = torch.randn(2, 6), torch.randn(2, 6)
    t = torch.tensor([100, 900])

    class Oracle(torch.nn.Module):
        def forward(self, x, t_in, cond=None):
            return n

    x_ve = y + sched.sigmas[t].reshape(-1, 1) * n
    assert torch.allclose(VPEpsDenoiser(Oracle(), sched)(x_ve, sched.sigmas[t]), y, atol=1e-4)


def test_cfg_combines_conditional_and_unconditional() -> None:
    def D(x, sigma, cond=None):
        return x + (cond["label"] >= 0).double().reshape(-1, 1) * 10

    def null(cond):
        return {"label": torch.full_like(cond["label"], -1)}

    x = torch.zeros(2, 1, dtype=torch.float64)
    cond = {"label": torch.tensor([3, 4])}
    assert torch.allclose(CFGDenoiser(D, 1.0, null)(x, torch.ones(2), cond), x + 10)
    assert torch.allclose(CFGDenoiser(D, 0.0, null)(x, torch.ones(2), cond), x)
    assert torch.allclose(CFGDenoiser(D, 2.5, null)(x, torch.ones(2), cond), x + 25)
    # the spec object builds the same wrapper, and none for w = 1 or an unconditional model
    assert torch.allclose(GuidanceSpec(scale=2.5).wrap(D, null)(x, torch.ones(2), cond), x + 25)
    assert GuidanceSpec(scale=1.0).wrap(D, null) is D and GuidanceSpec(scale=3.0).wrap(D, None) is D


def test_run_sampler_dispatch_and_bad_schedule() -> None:
    x, sig = torch.randn(2, 3), karras_sigmas(4)
    assert run_sampler(SamplerSpec("heun", 4), gaussian_denoiser, x.clone(), sig).nfe == 7
    assert (
        run_sampler(
            SamplerSpec("ddpm", 4), gaussian_denoiser, x.clone(), sig, generator=torch.Generator().manual_seed(0)
        ).nfe
        == 4
    )
    with pytest.raises(ValueError, match="end with 0"):
        sample_heun(gaussian_denoiser, x, sig[:-1])

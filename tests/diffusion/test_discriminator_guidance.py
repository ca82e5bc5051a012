"""Discriminator guidance against closed forms on Gaussians.

p_data = N(mu1, s^2 I) and p_model = N(mu2, s^2 I) in 2-D: the noised densities are N(mu_k, (s^2 + sigma^2) I), the
optimal discriminator's logit is log N(x; mu1, v) - log N(x; mu2, v) with v = s^2 + sigma^2, and the exact
denoisers are the Gaussian posterior means mu_k + s^2 / v (x - mu_k). DG with w = 1 and the exact discriminator
must turn the model's denoiser into the data's.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_dpmot.diffusion.discriminator_guidance import (
    DGDenoiser,
    DiscriminatorGuidanceSpec,
    load_discriminator,
    logit_gradient,
)
from lightning_dpmot.diffusion.guidance import GuidanceSpec
from lightning_dpmot.sampling.schedules import karras_sigmas
from lightning_dpmot.sampling.spec import SamplerSpec, run_sampler

S = 0.3
MU_DATA = torch.tensor([1.0, -0.5], dtype=torch.float64)
MU_MODEL = torch.tensor([-0.7, 0.4], dtype=torch.float64)


def log_normal(x: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """log N(x; mu, var I) for x (B, d), var (B,) -> (B,)."""
    d = x.shape[1]
    return -((x - mu) ** 2).sum(1) / (2 * var) - d / 2 * torch.log(2 * math.pi * var)


class ExactLogit(nn.Module):
    """The optimal discriminator's logit log(d* / (1 - d*)) = log p_data,sigma - log p_model,sigma."""

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        var = S**2 + sigma.to(x.dtype) ** 2
        return log_normal(x, MU_DATA.to(x), var) - log_normal(x, MU_MODEL.to(x), var)


def posterior_mean(mu: Tensor) -> nn.Module:
    """The exact denoiser E[x0 | x_sigma] of N(mu, S^2 I)."""

    def denoise(x: Tensor, sigma: Tensor, cond: object = None) -> Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0]).to(x)[:, None]
        return mu.to(x) + S**2 / (S**2 + sigma**2) * (x - mu.to(x))

    return denoise  # type: ignore[return-value]


def points(n: int = 64, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g, dtype=dtype) * 2
    sigma = torch.exp(torch.randn(n, generator=g, dtype=dtype) * 1.2 - 1.2)
    return x, sigma


def test_exact_discriminator_turns_model_denoiser_into_data_denoiser() -> None:
    x, sigma = points()
    dg = DGDenoiser(posterior_mean(MU_MODEL), ExactLogit(), weight=1.0)
    target = posterior_mean(MU_DATA)(x, sigma)
    assert not torch.allclose(posterior_mean(MU_MODEL)(x, sigma), target, atol=1e-2)
    torch.testing.assert_close(dg(x, sigma), target, rtol=1e-12, atol=1e-12)


def test_weight_scales_the_correction_linearly() -> None:
    x, sigma = points()
    d = posterior_mean(MU_MODEL)(x, sigma)
    exact = posterior_mean(MU_DATA)(x, sigma) - d  # = sigma^2 (mu1 - mu2) / v
    guided = DGDenoiser(posterior_mean(MU_MODEL), ExactLogit(), weight=2.5)
    torch.testing.assert_close(guided(x, sigma) - d, 2.5 * exact)
    assert torch.equal(DGDenoiser(posterior_mean(MU_MODEL), ExactLogit(), weight=0.0)(x, sigma), d)


def test_logit_gradient_closed_form_float32() -> None:
    x, sigma = points(dtype=torch.float32)
    grad = logit_gradient(ExactLogit(), x, sigma)
    expected = (MU_DATA - MU_MODEL).float()[None] / (S**2 + sigma[:, None] ** 2)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_sigma_window_switches_guidance_off_outside() -> None:
    x, _ = points(6)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 50.0], dtype=torch.float64)
    dg = DGDenoiser(posterior_mean(MU_MODEL), ExactLogit(), weight=1.0, sigma_min=0.1, sigma_max=5.0)
    out, model, data = dg(x, sigma), posterior_mean(MU_MODEL)(x, sigma), posterior_mean(MU_DATA)(x, sigma)
    inside = torch.tensor([False, True, True, True, True, False])
    torch.testing.assert_close(out[inside], data[inside], rtol=1e-12, atol=1e-12)
    assert torch.equal(out[~inside], model[~inside])
    outside_only = DGDenoiser(posterior_mean(MU_MODEL), ExactLogit(), 1.0, sigma_min=100.0, sigma_max=200.0)
    assert torch.equal(outside_only(x, sigma), model)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_gradient_flows_under_no_grad_and_inference_mode(context: str) -> None:
    x, sigma = points()
    dg = DGDenoiser(posterior_mean(MU_MODEL), ExactLogit(), weight=1.0)
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with ctx:
        x_in, s_in = x.clone(), sigma.clone()  # inference tensors under inference mode
        out = dg(x_in, s_in)
    torch.testing.assert_close(out, posterior_mean(MU_DATA)(x, sigma), rtol=1e-12, atol=1e-12)
    assert not out.requires_grad


def test_guidance_spec_composes_dg_for_every_sampler() -> None:
    """Sampling the data Gaussian's probability-flow ODE from the model's denoiser plus exact DG lands on p_data."""
    spec = GuidanceSpec(discriminator={"checkpoint": "exact", "weight": 1.0, "sigma_min": 0.0, "model": ExactLogit()})
    assert spec.needs_grad and spec.prepare(None, torch.arange(3), "cpu") == {}
    sigmas = karras_sigmas(32).double()
    guided = spec.wrap(posterior_mean(MU_MODEL), None, sigmas)
    assert isinstance(guided, DGDenoiser)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64) * sigmas[0]
    with torch.no_grad():
        out = run_sampler(SamplerSpec("heun", num_steps=32), guided, x, sigmas).x
    assert (out.mean(0) - MU_DATA).abs().max() < 0.03
    assert (out.std(0) - S).abs().max() < 0.03


def test_spec_validation_and_off_switch() -> None:
    with pytest.raises(ValueError, match="sigma_min"):
        DiscriminatorGuidanceSpec("x.ckpt", sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="finite"):
        DiscriminatorGuidanceSpec("x.ckpt", weight=float("nan"))
    off = GuidanceSpec(discriminator={"checkpoint": "missing.ckpt", "weight": 0.0})
    assert not off.needs_grad
    d = posterior_mean(MU_MODEL)
    assert off.wrap(d, None) is d  # an inactive entry never reads its checkpoint


def test_bad_checkpoint_path_is_one_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = GuidanceSpec(discriminator={"checkpoint": str(tmp_path / "nope.ckpt")})
    with pytest.raises(FileNotFoundError, match="discriminator guidance: checkpoint not found: .*nope.ckpt"):
        spec.wrap(posterior_mean(MU_MODEL), None)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt"):
        load_discriminator(junk)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "lightning_dpmot.models.EDMModule"}}, other)
    with pytest.raises(ValueError, match="holds a EDMModule, not a DiscriminatorModule"):
        load_discriminator(other)

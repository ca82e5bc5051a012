"""MLPDenoiserNet: the residual MLP denoiser for vector (2-D toy) data."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from lightning_dpmot.nets import MLPDenoiserNet


def perturb_(net: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add Gaussian noise to every parameter, so that the near-zero output layer no longer hides the trunk."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return net


@pytest.mark.parametrize(
    ("dim", "kwargs"),
    [
        (2, {}),
        (3, dict(layer_norm=False, num_layers=2)),
        (2, dict(embedding_type="fourier", hidden=32, num_layers=0)),
    ],
)
def test_shapes_and_near_zero_init(dim: int, kwargs: dict) -> None:
    torch.manual_seed(0)
    net = MLPDenoiserNet((dim,), 0, **kwargs)
    x = torch.randn(5, dim)
    out = net(x, torch.randn(5))
    assert out.shape == (5, dim) and out.dtype == torch.float32
    assert 0 < out.abs().max().item() < 1e-3  # output layer starts at gain 1e-5
    assert perturb_(net)(x, torch.randn(5)).abs().mean().item() > 1e-2


def test_class_conditioning_and_null_label() -> None:
    torch.manual_seed(0)
    net = perturb_(MLPDenoiserNet((2,), 4, hidden=32, num_layers=2))
    x, sigma = torch.randn(1, 2).expand(5, -1), torch.full((5,), -0.2)
    out = net(x, sigma, {"label": torch.tensor([0, 1, 2, 3, -1])})
    assert torch.cdist(out, out).add(torch.eye(5)).min().item() > 1e-3  # five distinct outputs
    null = net(x, sigma)  # class_labels=None
    torch.testing.assert_close(net(x, sigma, {"label": torch.full((5,), -1)}), null, rtol=0, atol=0)
    torch.testing.assert_close(out[4], null[0])
    with pytest.raises(ValueError, match=r"class_labels must lie in \[-1, 3\]"):
        net(x, sigma, {"label": torch.tensor([0, 1, 2, 3, 4])})


def test_unconditional_net_ignores_class_labels() -> None:
    net = perturb_(MLPDenoiserNet((2,), 0, hidden=32, num_layers=2))
    x, sigma = torch.randn(3, 2), torch.randn(3)
    torch.testing.assert_close(net(x, sigma, {"label": torch.tensor([1, 2, -1])}), net(x, sigma), rtol=0, atol=0)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"needs a vector data_shape \(D,\) with D >= 1, got \(3, 32, 32\)"):
        MLPDenoiserNet((3, 32, 32))
    net = MLPDenoiserNet((2,), hidden=16, num_layers=1)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\), got \(4, 3\)"):
        net(torch.randn(4, 3), torch.randn(4))


def test_fits_a_conditional_function() -> None:
    """200 Adam steps regress y = (sin(x1 + 3 t), x0 * cos(t)) + class offset; the MSE drops >= 20x."""
    torch.manual_seed(0)
    net = MLPDenoiserNet((2,), 3, hidden=64, num_layers=2)
    offsets = torch.tensor([[1.0, 0.0], [0.0, -1.0], [-1.0, 1.0]])

    def batch(n: int) -> tuple[torch.Tensor, ...]:
        x, t, k = torch.randn(n, 2), torch.rand(n) * 2 - 1, torch.randint(0, 3, (n,))
        y = torch.stack([torch.sin(x[:, 1] + 3 * t), x[:, 0] * torch.cos(t)], dim=1) + offsets[k]
        return x, t, k, y

    x, t, k, y = batch(1024)
    initial = (net(x, t, {"label": k}) - y).square().mean().item()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(200):
        xb, tb, kb, yb = batch(256)
        loss = (net(xb, tb, {"label": kb}) - yb).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = (net(x, t, {"label": k}) - y).square().mean().item()
    assert final < initial / 20, (initial, final)


def test_constructor_follows_net_interface() -> None:
    params = list(inspect.signature(MLPDenoiserNet.__init__).parameters.values())[1:]
    assert [p.name for p in params[:2]] == ["data_shape", "num_classes"]
    doc = inspect.getdoc(MLPDenoiserNet) or ""
    for p in params[1:]:
        assert p.default is not inspect.Parameter.empty and p.annotation is not inspect.Parameter.empty, p.name
        assert f"    {p.name}:" in doc, f"{p.name} missing from the Args section"
    assert math.isclose(MLPDenoiserNet((2,)).blocks[0].fc1.weight.abs().max().item(), 0, abs_tol=1e-4)

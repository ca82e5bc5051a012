"""Residual MLP denoiser: shapes, near-zero init, conditioning, input errors, and a short regression fit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lightning_dpmot.nets import MLPDenoiserNet


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny nets gain nothing from intra-op threads; on the shared 2-core box they only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reinit_(net: nn.Module) -> nn.Module:
    """Unit-gain xavier for every Linear (undoing the near-zero output/residual init)."""
    gen = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight, generator=gen)
    return net


@pytest.mark.parametrize(
    ("dim", "kwargs"),
    [
        (2, {}),
        (3, dict(hidden=32, num_layers=1, layer_norm=False)),
        (5, dict(hidden=16, num_layers=0, embedding_type="fourier")),
    ],
)
def test_shapes_and_near_zero_init(dim: int, kwargs: dict) -> None:
    torch.manual_seed(0)
    net = MLPDenoiserNet((dim,), 0, **kwargs)
    x = torch.randn(7, dim)
    out = net(x, torch.randn(7))
    assert out.shape == (7, dim) and out.abs().max() < 1e-3
    out = reinit_(net)(x, torch.randn(7))
    assert out.shape == (7, dim) and out.std() > 1e-2


def test_class_conditioning_and_null_label() -> None:
    torch.manual_seed(0)
    net = reinit_(MLPDenoiserNet((2,), 4, hidden=32, num_layers=2))
    x, sigma = torch.randn(3, 2), torch.randn(3)
    out = net(x, sigma, torch.tensor([0, 1, -1]))
    other = net(x, sigma, torch.tensor([3, 1, -1]))
    assert (out[0] - other[0]).abs().max() > 1e-3  # class changes the output of that sample
    torch.testing.assert_close(out[1:], other[1:])  # ... and only of that sample
    assert torch.equal(net(x, sigma, torch.full((3,), -1)), net(x, sigma, None))
    with pytest.raises(ValueError, match=r"class_labels must lie in \[-1, 3\]"):
        net(x, sigma, torch.tensor([0, 4, 1]))


def test_unconditional_ignores_labels_and_noise_conditions() -> None:
    torch.manual_seed(0)
    net = reinit_(MLPDenoiserNet((2,), 0, hidden=32, num_layers=2))
    x, sigma = torch.randn(3, 2), torch.randn(3)
    assert torch.equal(net(x, sigma, torch.tensor([5, 0, 1])), net(x, sigma))
    assert (net(x, sigma) - net(x, sigma + 1.0)).abs().max() > 1e-3
    # timesteps 0..999 as floats work too, and a scalar is broadcast
    t = torch.tensor(500.0)
    assert torch.equal(net(x, t), net(x, t.expand(3)))


@pytest.mark.parametrize(
    ("data_shape", "message"),
    [((3, 32, 32), r"needs vector data_shape \(D,\)"), ((0,), r"needs vector data_shape \(D,\)")],
)
def test_bad_data_shape(data_shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MLPDenoiserNet(data_shape)


def test_bad_input_shape() -> None:
    net = MLPDenoiserNet((2,), hidden=8, num_layers=1)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\), got \(4, 3\)"):
        net(torch.randn(4, 3), torch.randn(4))


def test_fits_a_noise_dependent_function() -> None:
    """300 Adam steps regressing y = sin(2 x0) * exp(-x1^2) * cos(t) + class offset cut the loss > 20x."""
    torch.manual_seed(0)
    net = MLPDenoiserNet((2,), 2, hidden=64, num_layers=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def batch() -> tuple[torch.Tensor, ...]:
        x, t, y = torch.randn(256, 2), torch.rand(256) * 4 - 2, torch.randint(0, 2, (256,))
        value = torch.sin(2 * x[:, 0]) * torch.exp(-(x[:, 1] ** 2)) * torch.cos(t) + (2 * y - 1) * 0.5
        return x, t, y, torch.stack([value, -value], dim=1)

    def loss_of(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (net(x, t, y) - target).square().mean()

    test = batch()
    with torch.no_grad():
        initial = loss_of(*test).item()
    for _ in range(300):
        opt.zero_grad()
        loss_of(*batch()).backward()
        opt.step()
    with torch.no_grad():
        final = loss_of(*test).item()
    assert final < initial / 20, f"loss {initial:.4f} -> {final:.4f}"

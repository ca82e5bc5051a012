"""SemiDiscreteOT: one typed config validated by name, NaN noise refused, extreme target scales handled or refused.

Regressions (issue 9, item 10): NaN noise was mapped to cell 0 and a real target; 1e20-scale targets overflowed
``score_scale`` (inf lr, NaN h after one step, every sample in cell 0); ``eps=nan`` and other NaN settings were
accepted. The reference for the scaled problems is the same problem at unit scale (the power cells of ``a * y``
with heights ``a * h`` are those of ``y`` with ``h``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_dpmot.ot.semidiscrete import SemiDiscreteConfig, SemiDiscreteOT
from lightning_dpmot.ot.semidiscrete_maps import HardMap, SoftMap

NAN, INF = float("nan"), float("inf")
FAST = dict(num_mc_samples=4096, chunk_size=1024)


def cloud(seed: int = 0, n: int = 16, d: int = 4) -> tuple[Tensor, Tensor]:
    """Targets (n, d) and query noise (500, d)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randn(500, d, generator=gen)


# ------------------------------------------------------------------------------------------------ noise


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_noise_is_refused_by_assign_topk_forward_and_the_maps(bad: float) -> None:
    targets, x = cloud()
    solver = SemiDiscreteOT(targets, **FAST)
    x = x[:3].clone()
    x[1, 2] = bad
    message = r"noise x is non-finite: 1 of 3 samples contain NaN or infinite values"
    for call in (solver.assign, solver.forward, lambda z: solver.topk(z, 2), HardMap(solver), SoftMap(solver, k=2)):
        with pytest.raises(ValueError, match=message):
            call(x)


def test_a_diverged_potential_is_refused_instead_of_assigning_cell_0() -> None:
    targets, x = cloud()
    solver = SemiDiscreteOT(targets, **FAST)
    solver.h[3] = NAN
    with pytest.raises(RuntimeError, match="the potential h has 1 non-finite entries after 0 iterations"):
        solver.assign(x)


# ---------------------------------------------------------------------------------------------- target scale


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e25])
def test_extreme_target_scales_give_the_cells_of_the_unit_scale_problem(scale: float) -> None:
    targets, x = cloud()
    reference = SemiDiscreteOT(targets, **FAST)
    scaled = SemiDiscreteOT(targets * scale, **FAST)
    # the natural scale of h is exact (1e20: was inf, hence lr = inf and h = NaN after one step)
    assert math.isfinite(scaled.score_scale) and scaled.score_scale > 0
    assert scaled.score_scale == pytest.approx(reference.score_scale * scale, rel=1e-6)
    reference.fit(40, progress=False)
    scaled.fit(40, progress=False)
    assert torch.isfinite(scaled.h).all()
    assert (scaled.h / scale - reference.h).abs().max() < 1e-4 * reference.score_scale
    agree = (scaled.assign(x) == reference.assign(x)).float().mean()
    assert agree >= 0.99 and len(scaled.assign(x).unique()) == len(reference.assign(x).unique()) > 1


def test_score_scale_is_bit_identical_for_ordinary_targets() -> None:
    """Only extreme targets are rescaled: the default lr of ordinary problems (hence every h) is unchanged."""
    targets, _ = cloud(n=40, d=8)
    solver = SemiDiscreteOT(targets * 3.0 + 1.0)
    y = solver.targets
    y_bar = solver.nu.to(torch.float32) @ y
    spread = float(solver.nu @ (y - y_bar).square().sum(dim=1, dtype=torch.float64))
    assert solver.score_scale == math.sqrt(spread)


@pytest.mark.parametrize(("scale", "size"), [(1e30, "large"), (1e36, "large"), (1e-33, "small")])
def test_targets_beyond_the_fp32_score_range_are_refused_clearly(scale: float, size: str) -> None:
    targets, _ = cloud()
    with pytest.raises(ValueError, match=rf"targets are too {size} for fp32 scores: .* rescale the targets"):
        SemiDiscreteOT(targets * scale)


def test_targets_at_the_origin_are_still_accepted() -> None:
    solver = SemiDiscreteOT(torch.zeros(3, 2))
    assert solver.score_scale == 0.0 and float(solver.lr) == pytest.approx(0.25)  # DEFAULT_ASGD_RELATIVE_LR x 1


# ---------------------------------------------------------------------------------------------- settings

BAD_SETTINGS: list[tuple[dict[str, Any], str]] = [
    ({"eps": NAN}, "eps must be finite, got nan"),
    ({"eps": INF}, "eps must be finite, got inf"),
    ({"eps": 0.0}, "eps must be positive, got 0.0"),
    ({"eps": -1e-8}, "eps must be positive"),
    ({"lr": NAN}, "lr must be finite, got nan"),
    ({"lr": INF}, "lr must be finite, got inf"),
    ({"lr": 0.0}, "lr must be positive, got 0.0"),
    ({"lr": -0.1}, "lr must be positive"),
    ({"num_mc_samples": 0}, "num_mc_samples must be an integer >= 1, got 0"),
    ({"num_mc_samples": NAN}, "num_mc_samples must be an integer >= 1, got nan"),
    ({"num_mc_samples": 10.5}, "num_mc_samples must be an integer >= 1, got 10.5"),
    ({"chunk_size": 0}, "chunk_size must be an integer >= 1, got 0"),
    ({"target_chunk_size": -8}, "target_chunk_size must be an integer >= 1, got -8"),
    ({"betas": (NAN, 0.999)}, r"betas\[0\] must be finite, got nan"),
    ({"betas": (0.9, 1.0)}, r"betas must lie in \[0, 1\), got \(0.9, 1.0\)"),
    ({"betas": (0.9,)}, r"betas must be a pair \(beta1, beta2\), got \(0.9,\)"),
    ({"patience": -1}, "patience must be an integer >= 0, got -1"),
    ({"max_doublings": NAN}, "max_doublings must be an integer >= 0, got nan"),
    ({"lr_decay": 0.0}, "lr_decay must be positive, got 0.0"),
    ({"lr_decay": 1.5}, r"lr_decay must lie in \(0, 1\], got 1.5"),
    ({"lr_decay": NAN}, "lr_decay must be finite"),
    ({"tol": NAN}, "tol must be finite, got nan"),
    ({"tol": INF}, "tol must be finite, got inf"),
    ({"tol": 0.0}, "tol must be positive"),
    ({"criterion": "mean"}, "criterion must be 'rms' or 'max', got 'mean'"),
    ({"eval_factor": 0}, "eval_factor must be an integer >= 1, got 0"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"antithetic": "yes"}, "antithetic must be true or false, got 'yes'"),
    ({"bias_correction": 1}, "bias_correction must be true or false, got 1"),
    ({"antithetic": True, "chunk_size": 511}, "antithetic sampling needs an even chunk_size, got 511"),
    ({"source": "sobol"}, "source must be 'gaussian' or 'uniform'"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS, ids=[str(s) for s, _ in BAD_SETTINGS])
def test_bad_settings_raise_one_value_error_naming_the_setting(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SemiDiscreteConfig(**settings)
    with pytest.raises(ValueError, match=message):
        SemiDiscreteOT(torch.eye(3), **settings)
    with pytest.raises(ValueError, match=message):
        SemiDiscreteConfig().replace(**settings)


def test_unknown_settings_and_a_positional_config_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"unknown semi-discrete solver setting\(s\) \['lrr'\]; valid: source, optimizer, lr"
    ):
        SemiDiscreteOT(torch.eye(3), lrr=0.1)
    with pytest.raises(ValueError, match=r"unknown semi-discrete solver setting\(s\) \['all_reduce'\]"):
        SemiDiscreteConfig.from_mapping({"all_reduce": None})
    with pytest.raises(ValueError, match="second positional argument is the target masses: pass the settings as"):
        SemiDiscreteOT(torch.eye(3), SemiDiscreteConfig())  # type: ignore[arg-type]


def test_config_and_keyword_overrides_build_the_same_solver() -> None:
    targets, _ = cloud()
    config = SemiDiscreteConfig(lr=0.05, num_mc_samples=2048, chunk_size=512, patience=3, seed=7)
    a = SemiDiscreteOT(targets, config=config)
    b = SemiDiscreteOT(targets, lr=0.05, num_mc_samples=2048, chunk_size=512, patience=3, seed=7)
    c = SemiDiscreteOT(targets, config=config.replace(lr=0.5), lr=0.05)  # overrides win over the config
    assert a.config == b.config == c.config == config
    for solver in (a, b, c):
        solver.fit(12, progress=False)
    assert torch.equal(a.h, b.h) and torch.equal(a.h, c.h)


def test_config_canonicalises_yaml_and_checkpoint_values_and_resolves_the_seed() -> None:
    config = SemiDiscreteConfig(betas=[0.5, 0.9], chunk_size=512.0, num_mc_samples=1000.0, lr=1)  # type: ignore[arg-type]
    assert config.betas == (0.5, 0.9) and type(config.chunk_size) is int and type(config.num_mc_samples) is int
    assert type(config.lr) is float and config.seed is None
    assert SemiDiscreteConfig.from_mapping(config.as_dict()) == config
    assert config.as_dict()["betas"] == [0.5, 0.9]  # plain YAML / weights_only-safe
    assert SemiDiscreteOT(torch.eye(3), config=config).config.seed == 0  # None: seed 0 for a standalone solver
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.3  # type: ignore[misc]
    assert SemiDiscreteConfig.field_names() == (
        "source",
        "optimizer",
        "lr",
        "lr_exponent",
        "average_power",
        "num_mc_samples",
        "chunk_size",
        "target_chunk_size",
        "betas",
        "eps",
        "bias_correction",
        "patience",
        "max_doublings",
        "lr_decay",
        "tol",
        "criterion",
        "eval_factor",
        "seed",
        "antithetic",
    )

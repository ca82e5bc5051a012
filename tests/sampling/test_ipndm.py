"""iPNDM (constant-step Adams-Bashforth in sigma) and ipndm_v (variable-step weights): the weights against the
textbook constants and exact polynomial integrals, convergence on Gaussian data with the closed-form PF-ODE
solution, accuracy against Heun at equal NFE, NFE accounting and the SamplerSpec wiring."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from test_multistep_solvers import MU, final_error, gaussian_D, pf_ode_solution

from lightning_dpmot.sampling import (
    SamplerSpec,
    karras_sigmas,
    run_sampler,
    sample_heun,
    sample_ipndm,
    variable_step_weights,
)

TEXTBOOK_AB = {  # Adams-Bashforth, equal steps (Hairer-Norsett-Wanner, Table III.1.1)
    1: [1.0],
    2: [3 / 2, -1 / 2],
    3: [23 / 12, -16 / 12, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
}


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_variable_step_weights_on_equal_steps_are_the_adams_bashforth_constants(k: int) -> None:
    nodes = 5.0 + 0.5 * torch.arange(k, dtype=torch.float64)  # sigma_i, sigma_{i-1}, ... (sigma falls in time)
    w = variable_step_weights(nodes, torch.tensor(4.5, dtype=torch.float64))
    assert torch.allclose(w, torch.tensor(TEXTBOOK_AB[k], dtype=torch.float64), atol=1e-13)


def test_variable_step_weights_integrate_polynomials_exactly_on_uneven_nodes() -> None:
    """h * sum_j w_j p(s_j) = integral of p over the step for every p of degree < k (numpy's polyint as reference)."""
    nodes = torch.tensor([1.3, 2.1, 3.7, 6.0], dtype=torch.float64)
    a, b = 1.3, 0.45
    w = variable_step_weights(nodes, torch.tensor(b, dtype=torch.float64)).numpy()
    rng = np.random.default_rng(0)
    for degree in range(4):
        p = np.poly1d(rng.normal(size=degree + 1))
        exact = np.polyint(p)(b) - np.polyint(p)(a)
        assert (b - a) * (w * p(nodes.numpy())).sum() == pytest.approx(exact, rel=1e-12, abs=1e-12)


def test_constant_step_ipndm_is_second_order_on_the_karras_schedule() -> None:
    """The constant AB weights on EDM's smoothly uneven steps: error ratio -> 4 when N doubles, for every order."""
    for order in (2, 3, 4):
        errors = [final_error(partial(sample_ipndm, order=order), n) for n in (40, 80, 160)]
        for coarse, fine in zip(errors, errors[1:]):
            assert 3.6 < coarse / fine < 4.8, (order, errors)


def test_variable_step_weights_restore_third_order() -> None:
    errors = [final_error(partial(sample_ipndm, order=3, variable_step=True), n) for n in (40, 80, 160)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 6.0 < coarse / fine < 13.0, errors
    fine = final_error(partial(sample_ipndm, order=3, variable_step=True), 320)
    assert fine < final_error(partial(sample_ipndm, order=3), 320) / 3  # order 3 against 2 pays off at large N


def test_euler_is_order_one_and_uniform_grid_second_order() -> None:
    """order=1 is Euler's method; order 2 on a uniform grid ending at 0 has ratio -> 4 against the exact solution."""
    assert final_error(partial(sample_ipndm, order=1), 40) / final_error(partial(sample_ipndm, order=1), 80) == (
        pytest.approx(2.0, abs=0.1)
    )
    x_T = MU + 2.0 * torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = pf_ode_solution(x_T, 2.0, 0.0)

    def error(n: int) -> float:
        sigmas = torch.linspace(2.0, 0.0, n + 1, dtype=torch.float64)
        return (sample_ipndm(gaussian_D, x_T, sigmas, order=2).x - exact).abs().max().item()

    assert 3.5 < error(20) / error(40) < 4.5


def test_more_accurate_than_heun_at_few_nfe() -> None:
    """On EDM's schedule at NFE 5-20, iPNDM's error is at least 5x below Heun's at the neighbouring odd NFE."""
    for nfe in (5, 10, 20):
        heun = min(final_error(sample_heun, (nfe + 1) // 2), final_error(sample_heun, (nfe + 2) // 2))
        assert final_error(sample_ipndm, nfe) < heun / 5, nfe


def test_nfe_cond_and_spec_wiring() -> None:
    calls: list[object] = []

    def D(x: torch.Tensor, sigma: torch.Tensor, cond: object = None) -> torch.Tensor:
        calls.append(cond)
        return gaussian_D(x, sigma)

    x, sigmas = MU + 10 * torch.randn(2, 4, dtype=torch.float64), karras_sigmas(8, sigma_max=10.0)
    result = sample_ipndm(D, x, sigmas, cond={"label": 3})
    assert result.nfe == 8 and calls == [{"label": 3}] * 8
    for name, variable in (("ipndm", False), ("ipndm_v", True)):
        spec = SamplerSpec(name, 8)
        assert spec.nfe == 8 and spec.resolved_order == 4
        direct = sample_ipndm(gaussian_D, x, sigmas, order=4, variable_step=variable).x
        assert torch.equal(run_sampler(spec, gaussian_D, x, sigmas).x, direct)
    assert SamplerSpec("ipndm", order=3).tag == "ipndm3-karras-rho7"
    assert SamplerSpec("unipc").resolved_order == 2 and SamplerSpec("heun").resolved_order is None
    with pytest.raises(ValueError, match="order must be one of"):
        SamplerSpec("ipndm", order=5)
    with pytest.raises(ValueError, match="order must be 1, 2, 3 or 4"):
        sample_ipndm(gaussian_D, x, sigmas, order=0)

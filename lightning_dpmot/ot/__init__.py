"""Optimal transport: costs, assignment solvers, minibatch couplings, semi-discrete OT with its targets and maps."""

from lightning_dpmot.ot.assignment import METHODS, assignment_cost, solve_assignment
from lightning_dpmot.ot.auction import AuctionResult, auction_assignment
from lightning_dpmot.ot.costs import COSTS, cost_scale, inner_product_cost, pairwise_cost
from lightning_dpmot.ot.coupling import CouplingStats, coupling_permutation, coupling_stats
from lightning_dpmot.ot.latent_targets import (
    LatentTargets,
    targets_from_dataset,
    targets_from_model,
    targets_from_samples,
)
from lightning_dpmot.ot.semidiscrete import SemiDiscreteConfig, SemiDiscreteOT
from lightning_dpmot.ot.semidiscrete_maps import (
    MAP_NAMES,
    AEOTMap,
    HardMap,
    MapResult,
    RenoiseMap,
    SemiDiscreteMap,
    SoftMap,
    build_map,
    exact_fp32,
)
from lightning_dpmot.ot.sinkhorn import SinkhornResult, sinkhorn_assignment, sinkhorn_potentials

__all__ = [
    "COSTS",
    "MAP_NAMES",
    "METHODS",
    "AEOTMap",
    "AuctionResult",
    "CouplingStats",
    "HardMap",
    "LatentTargets",
    "MapResult",
    "RenoiseMap",
    "SemiDiscreteConfig",
    "SemiDiscreteMap",
    "SemiDiscreteOT",
    "SoftMap",
    "SinkhornResult",
    "assignment_cost",
    "auction_assignment",
    "build_map",
    "coupling_permutation",
    "coupling_stats",
    "exact_fp32",
    "cost_scale",
    "inner_product_cost",
    "pairwise_cost",
    "sinkhorn_assignment",
    "sinkhorn_potentials",
    "solve_assignment",
    "targets_from_dataset",
    "targets_from_model",
    "targets_from_samples",
]

"""Optimal transport: cost matrices, assignment solvers (exact, entropic, auction), semi-discrete OT."""

from lightning_dpmot.ot.assignment import METHODS, assignment_cost, solve_assignment
from lightning_dpmot.ot.auction import AuctionResult, auction_assignment
from lightning_dpmot.ot.costs import COSTS, cost_scale, inner_product_cost, pairwise_cost
from lightning_dpmot.ot.semidiscrete import SemiDiscreteOT
from lightning_dpmot.ot.sinkhorn import SinkhornResult, sinkhorn_assignment, sinkhorn_potentials

__all__ = [
    "COSTS",
    "METHODS",
    "AuctionResult",
    "SemiDiscreteOT",
    "SinkhornResult",
    "assignment_cost",
    "auction_assignment",
    "cost_scale",
    "inner_product_cost",
    "pairwise_cost",
    "sinkhorn_assignment",
    "sinkhorn_potentials",
    "solve_assignment",
]

"""Throughput and memory of one semi-discrete OT iteration against a bare matmul measured in the same run.

One potential iteration (``SemiDiscreteOT.cell_masses`` at M samples: RNG, blocked fp32 GEMM with h folded in,
running argmax, bincount) is timed against the bare GEMM of the same shapes, (M x d) @ (d x N), run in the
same row blocks with preallocated inputs and outputs (no RNG, no reduction). The ratio bare / iteration is the
fraction of matmul throughput the solver reaches; PASS needs >= 70 %. Also timed: the ways of adding h to a
score block (``addmm`` as used, ``mm`` then ``add_``, a GEMM on operands augmented with a ones/h column) and
antithetic sampling. Peak working memory of ``cell_masses`` is measured for several M
(``torch.cuda.max_memory_allocated`` on CUDA; on CPU the resident set size sampled by a thread during the
call, since tracemalloc does not see torch's allocator).

Examples::

    python benchmarks/semidiscrete_ot.py                                   # CPU: N=2000, d=3072, M=20000
    python benchmarks/semidiscrete_ot.py --device cuda --num-targets 10000 --num-samples 100000
    python benchmarks/semidiscrete_ot.py --device cuda --num-targets 50000 --num-samples 500000
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from collections.abc import Callable

import torch

from lightning_dpmot.ot.power_cells import chunk_generator, sample_source
from lightning_dpmot.ot.semidiscrete import SemiDiscreteOT


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Best wall time (seconds) of each function over ``repeats`` interleaved rounds, after one warm-up round.

    Interleaving (a, b, c, a, b, c, ...) exposes every candidate to the same load drift on a shared machine.
    """
    best = dict.fromkeys(fns, float("inf"))
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def make_solver(args: argparse.Namespace, device: torch.device, antithetic: bool = False) -> SemiDiscreteOT:
    gen = torch.Generator().manual_seed(0)
    targets = torch.randn(args.num_targets, args.dim, generator=gen)
    solver = SemiDiscreteOT(
        targets,
        num_mc_samples=args.num_samples,
        chunk_size=args.chunk_size,
        target_chunk_size=args.target_chunk_size,
        antithetic=antithetic,
    ).to(device)
    solver.h.copy_(torch.randn(args.num_targets, generator=gen).mul_(0.1 * solver.score_scale))
    return solver


def bare_matmul(solver: SemiDiscreteOT, num_samples: int) -> Callable[[], None]:
    """(M x d) @ (d x N) in the solver's row and column blocks, into preallocated outputs."""
    b, bt, n = solver.config.chunk_size, solver.config.target_chunk_size, solver.num_targets
    x = torch.randn(b, solver.dim, device=solver.targets.device)
    out = torch.empty(b, min(bt, n), device=x.device)
    blocks = [(s, min(bt, n - s)) for s in range(0, n, bt)]
    num_chunks = -(-num_samples // b)

    def run() -> None:
        for _ in range(num_chunks):
            for start, width in blocks:
                torch.mm(x, solver.targets[start : start + width].T, out=out[:, :width])

    return run


def rng_only(solver: SemiDiscreteOT, num_samples: int) -> Callable[[], None]:
    """The solver's sampling work alone: one seeded generator and one (chunk x d) draw per chunk."""
    device = solver.targets.device

    def run() -> None:
        for c in range(-(-num_samples // solver.config.chunk_size)):
            gen = chunk_generator(solver.config.seed, 0, 0, c, device=device)
            sample_source(solver.config.source, solver.config.chunk_size, solver.dim, gen, device=device)

    return run


def fold_variants(solver: SemiDiscreteOT) -> dict[str, Callable[[], object]]:
    """Three ways to form one (chunk x target block) score block with h added, followed by the row max."""
    b, bt = solver.config.chunk_size, min(solver.config.target_chunk_size, solver.num_targets)
    x = torch.randn(b, solver.dim, device=solver.targets.device)
    y, h = solver.targets[:bt], solver.h[:bt]
    ones = torch.ones(b, 1, device=x.device)

    def augmented() -> object:  # includes building the augmented operands, as a solver would per block
        return (torch.cat([x, ones], dim=1) @ torch.cat([y, h[:, None]], dim=1).T).max(dim=1)

    return {
        "addmm(h, x, y^T)": lambda: torch.addmm(h, x, y.T).max(dim=1),
        "mm then add_(h)": lambda: (x @ y.T).add_(h).max(dim=1),
        "[x, 1] @ [y, h]^T": augmented,
        "bare mm (no h, no max)": lambda: x @ y.T,
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory(solver: SemiDiscreteOT, num_samples: int) -> float:
    """Peak working memory of one ``cell_masses(num_samples)`` call above the memory held before it, MiB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the resident set size sampled every 2 ms by a thread while
    the call runs (tracemalloc does not see torch's allocator; the lifetime ``ru_maxrss`` has earlier peaks).
    """
    device = solver.targets.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        solver.cell_masses(num_samples)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        solver.cell_masses(num_samples)
    finally:
        done.set()
        watcher.join()
    return max(peak[0], _rss_mib()) - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-targets", type=int, default=2000, help="N")
    parser.add_argument("--dim", type=int, default=3072, help="d")
    parser.add_argument("--num-samples", type=int, default=20000, help="M, Monte Carlo samples per iteration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-size", type=int, default=8192, help="samples per GEMM block")
    parser.add_argument("--target-chunk-size", type=int, default=8192, help="targets per GEMM block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument(
        "--memory-samples",
        default="",
        help="comma-separated M for the memory table (default: M/2, M, 2M, 4M)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("highest")  # this script only: fp32 GEMMs, as the solver requires
    n, d, m = args.num_targets, args.dim, args.num_samples
    solver = make_solver(args, device)
    m_eff = int(solver.num_mc_samples)
    flop = 2.0 * m_eff * n * d
    print(
        f"N={n} d={d} M={m_eff} chunk={args.chunk_size} target_chunk={args.target_chunk_size} "
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}"
    )

    anti = make_solver(args, device, antithetic=True)
    times = best_times(
        {
            "bare": bare_matmul(solver, m_eff),
            "iter": lambda: solver.cell_masses(),
            "anti": lambda: anti.cell_masses(),
            "rng": rng_only(solver, m_eff),
        },
        device,
        args.repeats,
    )
    t_bare, t_iter, t_anti, t_rng = times["bare"], times["iter"], times["anti"], times["rng"]
    ratio = t_bare / t_iter
    print("\n| what | time [s] | GFLOP/s (2MNd) | vs bare matmul |")
    print("|---|---|---|---|")
    print(f"| bare matmul (M x d) @ (d x N) | {t_bare:.3f} | {flop / t_bare / 1e9:.1f} | 1.00 |")
    print(f"| cell_masses (one iteration) | {t_iter:.3f} | {flop / t_iter / 1e9:.1f} | {ratio:.2f} |")
    print(f"| cell_masses, antithetic | {t_anti:.3f} | {flop / t_anti / 1e9:.1f} (M samples) | {t_bare / t_anti:.2f} |")
    print(f"| RNG alone (M x d normals, per chunk) | {t_rng:.3f} | | |")
    print(f"\nthroughput ratio {ratio:.1%} of bare matmul: {'PASS' if ratio >= 0.70 else 'FAIL'} (target >= 70 %)")

    print("\n| one (chunk x target block) score block + row max | time [ms] |")
    print("|---|---|")
    for name, t in best_times(fold_variants(solver), device, args.repeats).items():
        print(f"| {name} | {t * 1e3:.1f} |")

    sizes = [int(s) for s in args.memory_samples.split(",")] if args.memory_samples else [m // 2, m, 2 * m, 4 * m]
    print("\n| M | peak working memory of cell_masses [MiB] |")
    print("|---|---|")
    for size in sizes:
        print(f"| {size} | {peak_memory(solver, size):.1f} |")
    block = args.chunk_size * (min(args.target_chunk_size, n) + d) * 4 / 2**20
    print(f"(one score block + one sample chunk: {block:.1f} MiB; targets: {n * d * 4 / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()

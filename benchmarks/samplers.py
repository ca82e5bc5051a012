"""Seconds per sample of each ODE solver at equal NFE, and its overhead beyond the network evaluations.

Solvers: ``euler`` (the baseline of every ratio), ``heun`` (EDM Alg. 1, NFE = 2N - 1), ``dpmpp_2m``, ``dpmpp_3m``,
``unipc`` (order ``--unipc-order``, ``--unipc-variant``), ``ipndm`` and ``ipndm_v`` (order 4), all from the same noise
with the quickstart-sized DDPM++
(``configs/quickstart.yaml``: 1 x 8 x 8, 32 channels, mult [1, 2], one block, attention at 4 px) with random weights
(the costs are those of a trained net). The denoiser is wrapped in a timer, so every run splits its own time into
network evaluations and solver work: ``overhead/NFE`` = (total - time in the network) / NFE as a fraction of the
mean time of one network evaluation in that run (target <= 5 %). Solvers are timed ``--repeats`` times in alternating
order; medians are reported.

    OMP_NUM_THREADS=1 python benchmarks/samplers.py [--nfe 19] [--batch-size 64] [--repeats 5] [--device cpu]

``--nfe`` must be odd (Heun uses 2N - 1 evaluations).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

SOLVERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "ipndm_v")


class TimedDenoiser:
    """D(x, sigma, cond) that accumulates the wall time spent inside the network (synchronised on a GPU)."""

    def __init__(self, denoiser: torch.nn.Module, device: torch.device) -> None:
        self.denoiser, self.device = denoiser, device
        self.seconds, self.calls = 0.0, 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, x: Tensor, sigma: Tensor, cond: object = None) -> Tensor:
        self._sync()
        start = time.perf_counter()
        out = self.denoiser(x, sigma, cond)
        self._sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def build_denoiser(device: torch.device) -> torch.nn.Module:
    from lightning_dpmot.diffusion.edm import EDMPrecond
    from lightning_dpmot.nets import DDPMppUNet

    torch.manual_seed(0)
    net = DDPMppUNet(
        (1, 8, 8), 0, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0
    )
    return EDMPrecond(net, sigma_data=0.5).to(device).eval()


def run(name: str, args: argparse.Namespace, denoiser: torch.nn.Module, x_T: Tensor) -> dict[str, float]:
    from lightning_dpmot.sampling import SamplerSpec, karras_sigmas, run_sampler

    kwargs = {"order": args.unipc_order, "variant": args.unipc_variant} if name == "unipc" else {}
    spec = SamplerSpec.from_nfe(name, args.nfe, **kwargs)  # type: ignore[arg-type]
    sigmas = karras_sigmas(spec.num_steps, 0.002, 80.0, 7.0)
    timed = TimedDenoiser(denoiser, x_T.device)
    timed._sync()
    start = time.perf_counter()
    with torch.no_grad():
        result = run_sampler(spec, timed, x_T, sigmas)
    timed._sync()
    total = time.perf_counter() - start
    assert result.nfe == timed.calls == args.nfe, (name, result.nfe, timed.calls)
    per_eval = timed.seconds / timed.calls
    return {
        "seconds_per_sample": total / x_T.shape[0],
        "overhead_per_nfe": (total - timed.seconds) / timed.calls / per_eval,
        "finite": float(torch.isfinite(result.x).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nfe", type=int, default=19)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--unipc-order", type=int, default=2)
    parser.add_argument("--unipc-variant", default="bh2", choices=("bh1", "bh2"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.nfe % 2 == 0:
        parser.error("--nfe must be odd (Heun uses 2N - 1 evaluations)")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    denoiser = build_denoiser(device)
    x_T = 80.0 * torch.randn(args.batch_size, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    for name in SOLVERS:  # warm-up
        run(name, args, denoiser, x_T)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SOLVERS}
    for r in range(args.repeats):
        order = SOLVERS if r % 2 == 0 else SOLVERS[::-1]  # alternate, so drifting load hits all alike
        for name in order:
            results[name].append(run(name, args, denoiser, x_T))

    print(
        f"device {device}, batch {args.batch_size}, NFE {args.nfe}, median of {args.repeats} (alternating), "
        f"unipc order {args.unipc_order} {args.unipc_variant}, torch {torch.__version__}"
    )
    base = statistics.median(x["seconds_per_sample"] for x in results["euler"])
    print(f"{'solver':<10} {'ms/sample':>10} {'x euler':>8} {'overhead/NFE':>13}  target<=5%  finite")
    for name, runs in results.items():
        t = statistics.median(x["seconds_per_sample"] for x in runs)
        over = statistics.median(x["overhead_per_nfe"] for x in runs)
        ok = "PASS" if over <= 0.05 else "FAIL"
        finite = all(x["finite"] for x in runs)
        print(f"{name:<10} {1e3 * t:>10.3f} {t / base:>8.3f} {100 * over:>12.2f}%  {ok:>10}  {finite}")


if __name__ == "__main__":
    main()

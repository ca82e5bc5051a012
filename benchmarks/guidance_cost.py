"""Time and peak memory per image of cross-modal (CLIP) guidance vs classifier-free guidance alone, in one run.

Every setting generates the same prompts with the same sampler from the same text-to-image model:

* ``cfg``            — classifier-free guidance only (the baseline of every ratio);
* ``clip``           — CFG + cross-modal guidance, backprop through the U-Net (the default);
* ``clip_stopgrad``  — the same with the U-Net's output held constant (``grad_through_unet: false``);
* ``clip_ckpt``      — backprop through the U-Net with gradient checkpointing of the guided pass;
* ``clip_2batches``  — the default with ``cut_batches: 2`` (twice the views, gradients averaged).

Each setting runs in its own subprocess (so the peak memory is its own): CUDA peak allocated memory on a GPU, the
process's peak RSS on a CPU, minus the same process's figure after loading the models (the cost of generating).
Settings are timed ``--repeats`` times in alternating order and the median is reported with its ratio to ``cfg``.

    OMP_NUM_THREADS=1 python benchmarks/guidance_cost.py --ckpt <text2img .ckpt> --guide <matching .ckpt> \\
        [--batch-size 8] [--steps 18] [--repeats 3] [--device cpu]

Without ``--ckpt``/``--guide`` the models are built from ``configs/text2img/shapes.yaml``'s architecture and
``MatchingModel.small`` with random weights: the costs are the same, the images are not meaningful.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from typing import Any

import torch

SETTINGS: dict[str, dict[str, Any]] = {
    "cfg": {},
    "clip": {"grad_through_unet": True},
    "clip_stopgrad": {"grad_through_unet": False},
    "clip_ckpt": {"grad_through_unet": True, "grad_checkpoint": True},
    "clip_2batches": {"grad_through_unet": True, "cut_batches": 2},
}
PROMPTS = [
    "a large red circle",
    "a small blue triangle",
    "a large green square to the left of a small yellow cross",
    "a small purple circle above a large orange triangle",
]


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB -> MiB (Linux)


def load_models(args: argparse.Namespace) -> tuple[Any, Any]:
    from lightning_dpmot.nets.matching import MatchingModel, load_matching_model

    if args.ckpt:
        from lightning_dpmot.models.dpm_ot import load_diffusion_module

        module = load_diffusion_module(args.ckpt)
    else:
        from lightning_dpmot.models import TextToImageModule
        from lightning_dpmot.nets import DDPMppUNet
        from lightning_dpmot.nets.text_encoder import TextEncoder

        net = partial(
            DDPMppUNet,
            model_channels=32,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[8],
            cross_attn_resolutions=[16, 8],
            num_heads=2,
            dropout=0.0,
        )
        module = TextToImageModule(net, text_encoder=TextEncoder(max_length=32), data_shape=(3, 16, 16))
    guide = load_matching_model(args.guide) if args.guide else MatchingModel.small(seed=0)
    return module.to(args.device).eval(), guide.to(args.device)


def run_setting(args: argparse.Namespace) -> dict[str, Any]:
    from lightning_dpmot.diffusion import CrossModalSpec, GuidanceSpec, GuideModel
    from lightning_dpmot.sampling.spec import SamplerSpec

    if args.device == "cpu":
        torch.set_num_threads(1)
    device = torch.device(args.device)
    module, guide = load_models(args)
    base = peak_mb(device)
    flags = SETTINGS[args.setting]
    cross = None
    if args.setting != "cfg":
        cross = CrossModalSpec(guides=[GuideModel("guide", model=guide)], scale=args.clip_scale, **flags)
    guidance = GuidanceSpec(scale=args.cfg_scale, cross_modal=cross)
    spec = SamplerSpec(name="heun", num_steps=args.steps)
    prompts = (PROMPTS * args.batch_size)[: args.batch_size]
    seeds = torch.arange(args.batch_size)
    module.generate(seeds[:1], {"caption_en": prompts[:1]}, spec=spec, guidance=guidance)  # warm-up (caches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = peak_mb(device)
    start = time.perf_counter()
    result = module.generate(seeds, {"caption_en": prompts}, spec=spec, guidance=guidance)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "setting": args.setting,
        "seconds_per_image": seconds / args.batch_size,
        "peak_mb": peak_mb(device) - base,
        "nfe": result.nfe,
        "finite": bool(torch.isfinite(result.x).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="text-to-image checkpoint (default: random weights)")
    parser.add_argument("--guide", default=None, help="matching-model checkpoint (default: random weights)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--clip-scale", type=float, default=10.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(run_setting(args)))
        return
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--setting")]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    for r in range(args.repeats):
        order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
        for name in order:
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--setting", name],
                check=True,
                capture_output=True,
                text=True,
            )
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    device = args.device
    print(
        f"device {device}, batch {args.batch_size}, Heun {args.steps} steps, CFG w={args.cfg_scale}, "
        f"CLIP s={args.clip_scale}, {args.repeats} repeats, weights: {'trained' if args.ckpt else 'random'}"
    )
    base_t = statistics.median(x["seconds_per_image"] for x in results["cfg"])
    base_m = statistics.median(x["peak_mb"] for x in results["cfg"])
    print(f"{'setting':<15} {'s/image':>9} {'x cfg':>7} {'peak MiB':>9} {'x cfg':>7}  finite")
    for name, runs in results.items():
        t = statistics.median(x["seconds_per_image"] for x in runs)
        m = statistics.median(x["peak_mb"] for x in runs)
        ok = all(x["finite"] for x in runs)
        ratio = f"{m / base_m:>7.2f}" if base_m >= 1.0 else f"{'n/a':>7}"  # RSS moves in pages: no ratio to ~0
        print(f"{name:<15} {t:>9.3f} {t / base_t:>7.2f} {m:>9.1f} {ratio}  {ok}")


if __name__ == "__main__":
    main()

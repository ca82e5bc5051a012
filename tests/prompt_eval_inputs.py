"""Tiny local stand-ins for the paths of configs/eval/{shapes_text2img,unibench_gpu}.yaml (CPU tests).

Each helper returns command-line arguments to append after the config files: overrides of the placeholders, and
for unibench_gpu.yaml a copy of its callback list with every model path replaced by a tiny local model directory
(the repo file with substitutions, so its structure is what gets exercised).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# UniBench stays outside the repo: the shared folder beside the checkout, or DPMOT_UNIBENCH
UNIBENCH = Path(os.environ.get("DPMOT_UNIBENCH", REPO / ".." / "shared" / "unibench")).expanduser().resolve()


def tiny_matching_dir(path: Path, seed: int) -> Path:
    """A tiny random CLIP (ByT5 bytes: reads Chinese) saved as a local Hugging Face directory."""
    from lightning_dpmot.nets.matching import MatchingModel

    if not (path / "config.json").is_file():
        MatchingModel.small(image_size=16, width=16, text_width=16, embed_dim=8, seed=seed).save_pretrained(path)
    return path


def tiny_prompt_dir(root: Path, n: int = 2) -> Path:
    """The first n lines of the embedded benchmark, without labels, laid out like UniBench."""
    bench = REPO / "benchmarks" / "shapes_bench"
    for folder in ("English", "Chinese"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for split in ("simple_scene", "complex_scene"):
            lines = (bench / folder / f"{split}.txt").read_text(encoding="utf-8").splitlines()[:n]
            (root / folder / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def shapes_eval_overrides(root: Path) -> list[str]:
    """configs/eval/shapes_text2img.yaml: absolute benchmark path, a tiny scorer, a small classifier budget."""
    cb = "--trainer.callbacks.init_args"
    return [
        f"{cb}.prompts={REPO / 'benchmarks' / 'shapes_bench'}",
        f"{cb}.scorer={tiny_matching_dir(root / 'judge', seed=11)}",
        f"{cb}.cache_dir={root / 'cache'}",
        f'{cb}.classifier_options={{"num_train": 64, "epochs": 1}}',
    ]


def unibench_gpu_callbacks(root: Path, prompts: Path, max_prompts: int | None = None, k: int | None = None) -> Path:
    """A copy of unibench_gpu.yaml's callbacks with tiny guides/scorers, 2 Euler steps and ``prompts``; its path."""
    config = yaml.safe_load((REPO / "configs" / "eval" / "unibench_gpu.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    args = callbacks[0]["init_args"]
    for i, guide in enumerate(args["guidance"]["cross_modal"]["guides"]):
        guide["source"] = str(tiny_matching_dir(root / f"guide{i}", seed=20 + i))
    args["scorer"] = {
        lang: str(tiny_matching_dir(root / f"scorer_{lang}", seed=30 + i)) for i, lang in enumerate(args["scorer"])
    }
    args["guidance"]["cross_modal"]["cutouts"] = {"overview": 1, "inner": 1}
    args["sampler"] = {"name": "euler", "num_steps": 2}
    args["prompts"] = str(prompts)
    args["batch_size"] = 2
    if max_prompts is not None:
        args["max_prompts"] = max_prompts
    if k is not None:
        args["k"] = k
    path = root / "unibench_gpu_callbacks.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}, allow_unicode=True, sort_keys=False))
    return path

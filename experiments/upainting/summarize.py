"""Markdown tables from the ``results.csv`` files that ``experiments/upainting/run.py`` writes.

    python experiments/upainting/summarize.py experiments/upainting/results/*/results.csv \
        [--panel out.png --images /tmp/upF/main1 /tmp/upF/main2 --rows 8]

One row per (setting, CLIP scale, split): exact caption accuracy and the judge's CLIP score for English and Chinese
prompts, classifier-feature FID with its sample counts, and seconds per image. A folder's ``run.json`` gives the
CLIP scale of its settings.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

ORDER = ("none", "cfg", "clip", "cfg_clip", "cfg_clip_early", "cfg_clip_decay", "cfg_clip_late")


def load(paths: list[str]) -> list[dict[str, str]]:
    rows = []
    for p in paths:
        run = json.loads((Path(p).parent / "run.json").read_text()) if (Path(p).parent / "run.json").exists() else {}
        with open(p, encoding="utf-8") as f:
            for row in csv.DictReader(f):
                guided = row["setting"] not in ("none", "cfg")
                row["s"] = f"{run.get('clip_scale', '?'):g}" if guided and run else ("" if not guided else "?")
                rows.append(row)
    return rows


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def f3(value: str) -> str:
    return f"{float(value):.3f}" if value not in ("", None) else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="+")
    parser.add_argument("--panel", default=None, help="write a settings-by-prompt panel of complex scenes here")
    parser.add_argument("--images", nargs="*", default=[], help="run.py output folders holding images/")
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()
    if args.panel:
        panel(args.images, Path(args.panel), args.rows)
    rows = load(args.csv)
    keyed = {(r["setting"], r["s"], r["split"], r["language"]): r for r in rows}
    combos = sorted(
        {(r["setting"], r["s"], r["split"]) for r in rows},
        key=lambda t: (t[2] != "simple_scene", ORDER.index(t[0]) if t[0] in ORDER else 99, _number(t[1])),
    )
    print("| split | setting | s | exact EN | exact ZH | judge CLIP EN | judge CLIP ZH | FID EN (n) | s / image EN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setting, s, split in combos:
        en, zh = keyed.get((setting, s, split, "English")), keyed.get((setting, s, split, "Chinese"))
        if en is None or zh is None:
            continue
        fid = f"{float(en['fid']):.0f} ({en['fid_n_generated']}/{en['fid_n_real']})" if en.get("fid") else ""
        print(
            f"| {split.replace('_scene', '')} | {setting} | {s} | {f3(en['exact'])} | {f3(zh['exact'])} | "
            f"{float(en['clip_score']):.2f} | {float(zh['clip_score']):.2f} | {fid} | "
            f"{float(en['seconds_per_image']):.2f} |"
        )
    print("\nPer attribute (English prompts):\n")
    print("| split | setting | s | count | relation | shape | colour | size |")
    print("|---|---|---|---|---|---|---|---|")
    for setting, s, split in combos:
        en = keyed.get((setting, s, split, "English"))
        if en is not None:
            cells = " | ".join(f3(en[k]) for k in ("count", "relation", "shape", "colour", "size"))
            print(f"| {split.replace('_scene', '')} | {setting} | {s} | {cells} |")


def panel(folders: list[str], path: Path, rows: int, split: str = "complex_scene") -> None:
    """Rows = the first prompts of ``split`` (English, sample 0), columns = the settings found in ``folders``."""
    import numpy as np
    import torch
    from PIL import Image

    from lightning_dpmot.utils.images import save_captioned_grid

    columns = [Path(f) / s for s in ORDER for f in folders if (Path(f) / s / "images").is_dir()]
    tiles, captions = [], []
    prompts = {}
    with open(columns[0] / "prompts.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["split"] == split and row["language"] == "English" and row["sample"] == "0":
                prompts[int(row["prompt_index"])] = row["prompt"]
    for i in range(rows):
        for col in columns:
            image = np.asarray(Image.open(col / "images" / f"{split}_English" / f"i{i:05d}_j00.png").convert("RGB"))
            tiles.append(torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1)
            captions.append(f"{col.name}" + (f"\n{prompts[i]}" if col == columns[0] else ""))
    save_captioned_grid(torch.stack(tiles), captions, path, ncol=len(columns), title=f"{split}, English, sample 0")


if __name__ == "__main__":
    main()

"""Write the embedded shapes benchmark (laid out like UniBench) next to this script.

    python benchmarks/shapes_bench/make_prompts.py [--out DIR]

Files: ``English/{simple_scene,complex_scene}.txt`` and ``Chinese/{...}.txt`` (100 prompts each, one per line,
line i of the English file is line i of the Chinese file) and ``labels/{...}.jsonl`` (the structured label of
line i). The prompts are the first 100 simple and 100 complex scenes of the held-out split drawn with data seed
``BENCHMARK_SEED`` (:func:`lightning_dpmot.data.shapes.benchmark_files`): every prompt names a (shape, colour)
pair that the training split never shows. ``tests/data/test_shapes.py`` regenerates them and compares.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_dpmot.data.shapes import BENCHMARK_SEED, BENCHMARK_SIZE, benchmark_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args()
    for rel, text in benchmark_files(BENCHMARK_SEED, BENCHMARK_SIZE).items():
        path = args.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({text.count(chr(10))} lines)")


if __name__ == "__main__":
    main()

"""DPM-OT against the strongest few-step solvers (issue 14): the same metrics as ``digits_eval.py``, with
DPM-Solver++(2M), UniPC (order 2, B(h) = e^h - 1) and iPNDM (order 4) beside DDIM, both from pure noise and as
DPM-OT's last leg.

    python experiments/dpm_ot/solvers_eval.py --runs experiments/dpm_ot/runs --dpm-ckpt <...> --edm-ckpt <...>

Rows (``--num-samples`` samples each, seeds 0..n-1, cached as ``<runs>/digits_eval/solvers_<key>.json``):

- the DDPM from pure noise (t = 999) on its own timesteps: DDIM, 2M, UniPC, iPNDM at NFE 5 / 10 / 20;
- the quickstart EDM from sigma_max = 80 on the rho = 7 schedule: Heun at NFE 9 / 11, the others at NFE 10 (the full
  EDM solver grid is in experiments/aot_vs_edm);
- DPM-OT with training-set targets at t_s = 250 (sigma_s = 0.96, the level where it stops copying), maps ``hard`` and
  ``renoise``:
  DDIM, 2M, UniPC and iPNDM on the DDPM's timesteps below t_s at NFE 5 / 10.

Writes ``results/solvers.csv`` and prints a markdown table of FID, copy rate and mode mixture.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from common import EXP_DIR, markdown_table, write_csv
from digits_eval import Evaluator, cached, dpm_ot_row, generate_baseline, sigma_of
from torch import Tensor

from lightning_dpmot.models.dpm_ot import DPMOTModule, load_diffusion_module
from lightning_dpmot.sampling.spec import SamplerSpec

SOLVERS = ("ddim", "dpmpp_2m", "unipc", "ipndm")
NOISE_NFES = (5, 10, 20)
HEUN_NFES = (9, 11)
EDM_NFES = (10,)
OT_LEVELS = (250,)
OT_MAPS = ("hard", "renoise")
OT_NFES = (5, 10)
COLUMNS = ("method", "solver", "t_s", "map", "nfe", "fid", "precision", "recall", "mmr@0.2", "copy_train",
           "copy_train_med", "own_target")  # fmt: skip


def baseline_settings() -> Iterator[tuple[str, str, SamplerSpec]]:
    """(model, solver, spec) of the pure-noise rows."""
    for name in SOLVERS:
        for nfe in NOISE_NFES:
            yield "dpm", name, SamplerSpec(name, nfe, "timesteps")
    for nfe in HEUN_NFES:
        yield "edm", "heun", SamplerSpec.from_nfe("heun", nfe)
    for name in SOLVERS[1:]:
        for nfe in EDM_NFES:
            yield "edm", name, SamplerSpec(name, nfe)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    runs = Path(args.runs)
    cache = runs / "digits_eval"
    ev = Evaluator()
    n = args.num_samples
    models = {"dpm": load_diffusion_module(args.dpm_ckpt), "edm": load_diffusion_module(args.edm_ckpt)}
    rows: list[dict[str, Any]] = []
    for model, name, spec in baseline_settings():

        def baseline(model: str = model, name: str = name, spec: SamplerSpec = spec) -> tuple[dict[str, Any], Tensor]:
            x, info = generate_baseline(models[model], spec, n)
            row, _ = ev.score(x)
            head = {"method": "DDPM" if model == "dpm" else "EDM", "solver": name, "t_s": 999 if model == "dpm" else ""}
            head["sigma_s"] = sigma_of(999) if model == "dpm" else 80.0
            return {**head, "map": "", **info, **row}, x

        rows.append(cached(cache / f"solvers_{model}_{name}_nfe{spec.nfe}.json", baseline))

    for t_s in OT_LEVELS:
        ot_ckpt = runs / "ot_digits" / f"train_t{t_s}" / "checkpoints" / "last.ckpt"
        if not ot_ckpt.is_file():
            raise SystemExit(f"solvers_eval.py: error: no OT potential at {ot_ckpt} (fit it first, see run.sh)")
        for ot_map in OT_MAPS:
            module: DPMOTModule | None = None
            for name in SOLVERS:
                for nfe in OT_NFES:
                    key = cache / f"solvers_dpmot_train_t{t_s}_{ot_map}_{name}_nfe{nfe}.json"
                    spec = SamplerSpec(name, nfe, "timesteps")
                    if module is None and not key.is_file():
                        module = DPMOTModule(args.dpm_ckpt, str(ot_ckpt), ot_map=ot_map, sampler=spec)
                    compute = partial(dpm_ot_row, ev, module, spec, "train", t_s, ot_map, n)
                    row = cached(key, compute)
                    rows.append({**row, "solver": name})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="experiments/dpm_ot/runs")
    parser.add_argument("--dpm-ckpt", required=True)
    parser.add_argument("--edm-ckpt", required=True)
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args()
    rows = run(args)
    write_csv(rows, EXP_DIR / "results" / "solvers.csv")
    print(markdown_table(rows, COLUMNS))
    print(f"{len(rows)} rows -> {EXP_DIR / 'results' / 'solvers.csv'}")


if __name__ == "__main__":
    main()

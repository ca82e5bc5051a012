#!/usr/bin/env bash
# AOT vs. EDM on the bundled digits (CPU): identical models, data, seeds and budgets; the only difference is the
# OT coupling callback. Trains both arms for each seed, sweeps FID over NFE on rho = 7 and rho = 90, and writes
# experiments/aot_vs_edm/results/{table.md,results.csv,fid_vs_nfe.png}.
#   bash experiments/aot_vs_edm/run.sh [seeds...]      (default seeds: 0 1; ~7 minutes per run on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/aot_vs_edm/runs
seeds=${*:-0 1}
logger() { echo "{\"class_path\": \"lightning.pytorch.loggers.CSVLogger\", \"init_args\": {\"save_dir\": \"$out\", \"name\": \"$1\", \"version\": \"$2\"}}"; }

for seed in $seeds; do
  for arm in edm aot; do
    config=configs/quickstart.yaml
    [ "$arm" = aot ] && config=configs/aot_edm/digits.yaml
    if [ ! -f "$out/$arm/seed$seed/checkpoints/last.ckpt" ]; then
      dpmot fit --config "$config" --seed_everything "$seed" --trainer.logger "$(logger "$arm" "seed$seed")" \
          --trainer.enable_progress_bar false
    fi
    if [ ! -f "$out/$arm-eval/seed$seed/fid_vs_nfe/fid_vs_nfe.csv" ]; then
      dpmot test --config "$config" --config configs/eval/aot_sweep.yaml --seed_everything "$seed" \
          --trainer.logger "$(logger "$arm-eval" "seed$seed")" --trainer.enable_progress_bar false \
          --ckpt_path "$out/$arm/seed$seed/checkpoints/last.ckpt"
    fi
  done
done
python experiments/aot_vs_edm/summarize.py "$out" experiments/aot_vs_edm/results

#!/usr/bin/env bash
# DPM-OT (issue D) on CPU: 2-D 5x5 grid and 8x8 digits. Trains the DDPM models, fits the semi-discrete OT potentials
# at several junction levels t_s (sigma_s = VPSchedule("linear").sigmas[t_s]), evaluates everything and writes
# experiments/dpm_ot/results/. Steps whose outputs exist are skipped. One thread per process, run sequentially.
#   bash experiments/dpm_ot/run.sh
# Needs the quickstart EDM checkpoint of experiments/aot_vs_edm (read only) for the EDM Heun baseline; override with
#   EDM_CKPT=<path> bash experiments/dpm_ot/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
out=experiments/dpm_ot/runs
edm_ckpt=${EDM_CKPT:-experiments/aot_vs_edm/runs/edm/seed0/checkpoints/last.ckpt}
logger() { echo "{\"class_path\": \"lightning.pytorch.loggers.CSVLogger\", \"init_args\": {\"save_dir\": \"$out\", \"name\": \"$1\", \"version\": \"$2\"}}"; }
sigma() { python -c "from lightning_dpmot.diffusion.vp import VPSchedule; print(repr(float(VPSchedule('linear').sigmas[$1])))"; }
fit() {  # fit <name> <version> <args...>: dpmot fit unless <out>/<name>/<version>/checkpoints/last.ckpt exists
  local name=$1 version=$2; shift 2
  if [ ! -f "$out/$name/$version/checkpoints/last.ckpt" ]; then
    /usr/bin/time -f "$name/$version: %e s wall" dpmot fit "$@" --trainer.logger "$(logger "$name" "$version")" \
        --trainer.enable_progress_bar false
  fi
}

# 1. the diffusion models (DDPM, eps-prediction, linear betas, T = 1000)
fit dpm_digits seed0 --config configs/dpm/digits.yaml --seed_everything 0
# the toy DDPM trains 20,000 steps instead of the config's 3,000 (25 min on CPU): at 3,000 steps 49 % of its DDIM-1000
# samples fall between modes, at 20,000 steps 15 %
fit dpm_toy2d seed0 --config configs/dpm/toy2d.yaml --seed_everything 0 --trainer.max_steps 20000 \
    --trainer.check_val_every_n_epoch 400

# 2. 2-D toy: OT potentials on 250 of the DDPM's 20,000 training points (10 per mode) at t_s = 27 and 100
for t in 27 100; do
  fit ot_toy2d "t$t" --config configs/dpm_ot/toy2d_fit.yaml --model.init_args.sigma_s "$(sigma $t)" \
      --data.init_args.num_train 20000 --data.init_args.batch_size 200
done
if [ ! -f experiments/dpm_ot/results/toy2d.csv ]; then
  python experiments/dpm_ot/toy2d.py --dpm-ckpt "$out/dpm_toy2d/seed0/checkpoints/last.ckpt" \
      --ot "t27=$out/ot_toy2d/t27/checkpoints/last.ckpt" --ot "t100=$out/ot_toy2d/t100/checkpoints/last.ckpt"
fi

# 3. digits: OT potentials on the training split (1,528) and on the val split (269) at five junction levels
for split in train val; do
  for t in 5 20 50 100 250; do
    fit ot_digits "${split}_t$t" --config configs/dpm_ot/digits_fit.yaml --model.init_args.sigma_s "$(sigma $t)" \
        --model.init_args.split "$split"
  done
done
python experiments/dpm_ot/digits_eval.py --runs "$out" --num-samples 1000 \
    --dpm-ckpt "$out/dpm_digits/seed0/checkpoints/last.ckpt" --edm-ckpt "$edm_ckpt"
python experiments/dpm_ot/summarize.py --runs "$out"

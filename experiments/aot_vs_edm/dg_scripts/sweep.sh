# Usage: bash experiments/aot_vs_edm/dg_scripts/<script>.sh <args> (see the README section "Discriminator guidance (seed 0)").
set -e
cd "$(git rev-parse --show-toplevel)" && source .venv/bin/activate && export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
arm=$1; weight=$2; disc=${3:-$arm}; smax=${4:-}
cfg=configs/quickstart.yaml; [ $arm = aot ] && cfg=configs/aot_edm/digits.yaml
name=sweep_${arm}_w${weight}_d${disc}; extra="--model.init_args.guidance.discriminator.sigma_max=152.0"  # DG's window
if [ -n "$smax" ]; then name=${name}_smax$smax; extra="--model.init_args.guidance.discriminator.sigma_max=$smax"; fi
start=$(date +%s)
dpmot test --config $cfg --config configs/eval/dg_sweep.yaml --seed_everything 0 \
  --ckpt_path experiments/aot_vs_edm/runs/$arm/seed0/checkpoints/last.ckpt \
  --model.init_args.guidance.discriminator.checkpoint=experiments/aot_vs_edm/runs/dg/disc_$disc/seed0/checkpoints/last.ckpt \
  --model.init_args.guidance.discriminator.weight=$weight $extra \
  --trainer.logger '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "experiments/aot_vs_edm/runs/dg", "name": "'$name'", "version": "seed0"}}' \
  --trainer.enable_progress_bar=false
echo "$name sweep seconds: $(( $(date +%s) - start ))"

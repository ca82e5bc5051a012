# Usage: bash experiments/aot_vs_edm/dg_scripts/<script>.sh <args> (see the README section "Discriminator guidance (seed 0)").
# held-out seeds check: the same sweep over two seed ranges (0-1999 and 2000-3999)
set -e
cd "$(git rev-parse --show-toplevel)" && source .venv/bin/activate && export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
arm=$1; weight=$2; disc=$3; smax=$4
cfg=configs/quickstart.yaml; [ $arm = aot ] && cfg=configs/aot_edm/digits.yaml
name=sr2_${arm}_w${weight}_d${disc}_smax$smax
start=$(date +%s)
dpmot test --config $cfg --config configs/eval/dg_sweep.yaml --seed_everything 0 \
  --ckpt_path experiments/aot_vs_edm/runs/$arm/seed0/checkpoints/last.ckpt \
  --model.init_args.guidance.discriminator.checkpoint=experiments/aot_vs_edm/runs/dg/disc_$disc/seed0/checkpoints/last.ckpt \
  --model.init_args.guidance.discriminator.weight=$weight --model.init_args.guidance.discriminator.sigma_max=$smax \
  --trainer.callbacks.init_args.seed_ranges=2 --trainer.callbacks.init_args.precision_recall=false \
  --trainer.logger '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "experiments/aot_vs_edm/runs/dg", "name": "'$name'", "version": "seed0"}}' \
  --trainer.enable_progress_bar=false
echo "$name sweep seconds: $(( $(date +%s) - start ))"

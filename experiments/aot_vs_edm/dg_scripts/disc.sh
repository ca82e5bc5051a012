# Usage: bash experiments/aot_vs_edm/dg_scripts/<script>.sh <args> (see the README section "Discriminator guidance (seed 0)").
set -e
cd "$(git rev-parse --show-toplevel)" && source .venv/bin/activate && export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
arm=$1; coupling=$2; freeze=${3:-true}; sampling=${4:-lognormal}
name=disc_$arm; [ "$arm" = aot ] && [ "$coupling" = independent ] && name=${name}ind
[ "$freeze" = false ] && name=${name}ft; [ "$sampling" = loguniform ] && name=${name}lu
start=$(date +%s)
dpmot fit --config configs/dg/digits_disc.yaml --seed_everything 0 \
  --model.init_args.fake=experiments/aot_vs_edm/runs/dg/predict_$arm/seed0/predictions/samples.npz \
  --model.init_args.noise_coupling=$coupling --model.init_args.freeze_features=$freeze --model.init_args.sigma_sampling=$sampling \
  --trainer.logger '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "experiments/aot_vs_edm/runs/dg", "name": "'$name'", "version": "seed0"}}' \
  --trainer.enable_progress_bar=false
echo "$name disc seconds: $(( $(date +%s) - start ))"

# Usage: bash experiments/aot_vs_edm/dg_scripts/<script>.sh <args> (see the README section "Discriminator guidance (seed 0)").
set -e
cd "$(git rev-parse --show-toplevel)" && source .venv/bin/activate && export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
for arm in edm aot; do
  cfg=configs/quickstart.yaml; [ $arm = aot ] && cfg=configs/aot_edm/digits.yaml
  start=$(date +%s)
  dpmot predict --config $cfg --seed_everything 0 \
    --ckpt_path experiments/aot_vs_edm/runs/$arm/seed0/checkpoints/last.ckpt \
    --model.init_args.sampler.name=unipc --model.init_args.sampler.num_steps=10 \
    --data.init_args.predict_num_samples=2000 --data.init_args.predict_batch_size=250 \
    --data.init_args.predict_seed_offset=100000 \
    --trainer.logger '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "experiments/aot_vs_edm/runs/dg", "name": "predict_'$arm'", "version": "seed0"}}' \
    --trainer.enable_progress_bar=false
  echo "$arm predict seconds: $(( $(date +%s) - start ))"
done

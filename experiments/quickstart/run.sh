#!/usr/bin/env bash
# The CPU quickstart end to end: train EDM on the bundled digits, generate 1,000 samples, score them with a
# pixel classifier, and sweep FID against NFE. Training writes runs/quickstart/version_N; predict and test write into
# that run, at version_N/predict-<time>/ and version_N/test-eval-<time>/.
#   bash experiments/quickstart/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
newest() { ls -td "$1"/"$2"* | head -1; }

dpmot fit --config configs/quickstart.yaml
run=$(newest runs/quickstart version_)
echo "trained: $run (sample grids in $run/samples, FID curve in $run/fid_curve.png)"

dpmot predict --config configs/quickstart.yaml --ckpt_path "$run/checkpoints/last.ckpt" \
    --data.init_args.predict_num_samples 1000 --data.init_args.predict_batch_size 250
python experiments/quickstart/score_digits.py "$(newest "$run" predict-)/predictions/samples.npz"

dpmot test --config configs/quickstart.yaml --config configs/eval/fid_vs_nfe.yaml \
    --ckpt_path "$run/checkpoints/last.ckpt"
cat "$(newest "$run" test-)/fid_vs_nfe/fid_vs_nfe.csv"

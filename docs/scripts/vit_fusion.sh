#!/usr/bin/env bash
# Issue 12: the ready-made Fashion-MNIST ViT parents (checkpoints/fashion_vit) fused with every method.
# Usage: bash docs/scripts/vit_fusion.sh   (writes docs/results/fashion_vit/<run>/)
# Runs: main (every one-shot method, the orthogonal (rotation) symmetries too, each + REPAIR of the MLP hidden
# units; loss-barrier plot), finetune (every method and vanilla averaging + 2 epochs of fine-tuning: 10% of the
# parents' 20), streams (transformer-fusion's residual policy: a plan per branch, the mean rule at each sum,
# fusion.stream_policy=mean; the permutation methods of OTFusion only). Sinkhorn: epsilon ${EPS:-0.01} of the mean cost, the best Sinkhorn row on the 5,000 held-out
# training images (docs/RESULTS.md), never chosen on the test set.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
cfg=configs/fashion_vit.py
out=docs/results/fashion_vit
sink=(--config.fusion.relative_epsilon=mean --config.fusion.epsilon=${EPS:-0.01})
methods=ot-weights,ot-weights:sinkhorn,ot-weights:orthogonal,ot-acts,ot-acts:sinkhorn,ot-acts:orthogonal,wm,wm-soft
$py fuse.py --config=$cfg --out=$out/main "${sink[@]}" --config.experiment.repair=True \
  --config.experiment.method=$methods
$py fuse.py --config=$cfg --out=$out/finetune "${sink[@]}" --config.experiment.method=$methods \
  --config.experiment.finetune_epochs=2 --config.experiment.plots=False
$py fuse.py --config=$cfg --out=$out/streams "${sink[@]}" --config.fusion.stream_policy=mean \
  --config.experiment.method=ot-weights,ot-weights:sinkhorn,ot-acts,ot-acts:sinkhorn --config.experiment.plots=False

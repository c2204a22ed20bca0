#!/usr/bin/env bash
# The least-squares refit (config.refit, experiment.refit; docs/RESULTS.md "Least-squares refit"): the choice on
# held-out images, then the test set. Every row is also shown with REPAIR (hidden units and logits) for comparison.
# Usage: bash docs/scripts/refit_fusion.sh heldout|test   (writes docs/results/refit/<split>_<run>/)
# heldout: the Fashion MLPNets retrained on 55,000 images (runs/fashion_mlpnet_55k, parents 0-3 at the paper's
#   widths and parent 4 at double width: python train.py --config=configs/fashion_mlpnet.py --config.num_parents=5
#   --config.parent_widths='(1,1,1,1,2)' --config.data.max_train=55000 --config.parents_dir=runs/fashion_mlpnet_55k,
#   4 minutes): the pair, four, 4 -> 0 and 4,1 -> 0; the shipped VGG11s (trained on 55,000 images): the pair, four,
#   parent 4 (width 0.5) -> parent 0; the shipped BatchNorm-free ResNet18 pair (the refit of residual streams);
#   the VGG11-BN and ResNet18-BN pairs (the refit folds BatchNorm).
#   Evaluated on the 5,000 training images no parent trained on.
# test: the shipped parents on the test set: Fashion MLPNet pair and four, eight (runs/fashion_mlpnet8, when
#   trained), 4 -> 0 (runs/fashion_mlpnet5, when trained: the five parents of configs/fashion_mlpnet_experiment.py),
#   digits pair and four, VGG11 pair and four, BatchNorm-free ResNet18 pair, the VGG11 pair at width 0.5, the
#   VGG11-BN and ResNet18-BN pairs.
set -euo pipefail
cd "$(dirname "$0")/../.."
split=${1:?heldout or test}
py=${PYTHON:-.venv/bin/python}
out=docs/results/refit
both=(--config.experiment.plots=False --config.experiment.many_method= --config.experiment.refit=True
      --config.experiment.repair=True --config.experiment.repair_output=True)
mlp=(--config=configs/fashion_mlpnet.py)
vgg=(--config=configs/fashion_vgg11.py --config.fusion.relative_epsilon=mean --config.fusion.epsilon=0.2)
sink_w=(--config.fusion.relative_epsilon=mean --config.fusion.epsilon=0.05)
if [ "$split" = heldout ]; then
  ho=(--config.data.eval_split=heldout)
  mlp55=("${mlp[@]}" --config.data.max_train=55000 --config.parents_dir=runs/fashion_mlpnet_55k "${ho[@]}")
  $py fuse.py "${mlp55[@]}" "${both[@]}" "${sink_w[@]}" --config.num_parents=2 \
    --config.experiment.method=cca,ot-weights:sinkhorn,ot-acts,wm --out=$out/heldout_mlp_pair
  $py fuse.py "${mlp55[@]}" "${both[@]}" "${sink_w[@]}" --config.num_parents=4 \
    --config.experiment.method=cca,ot-weights:sinkhorn,ot-acts-many --out=$out/heldout_mlp_k4
  $py fuse.py "${mlp55[@]}" "${both[@]}" "${sink_w[@]}" --config.num_parents=5 --config.parent_widths='(1,1,1,1,2)' \
    --config.fusion.proper_marginals=True --config.experiment.groups='("4,0","4,1,0")' \
    --config.experiment.method=recommended --out=$out/heldout_mlp_widths
  $py fuse.py "${vgg[@]}" "${ho[@]}" "${both[@]}" --config.num_parents=2 \
    --config.experiment.method=cca,ot-acts:sinkhorn --out=$out/heldout_vgg11_pair
  $py fuse.py "${vgg[@]}" "${ho[@]}" "${both[@]}" --config.num_parents=4 \
    --config.experiment.method=cca,ot-acts:sinkhorn --out=$out/heldout_vgg11_k4
  $py fuse.py "${vgg[@]}" "${ho[@]}" "${both[@]}" --config.num_parents=5 --config.parent_widths='(1,1,1,1,2)' \
    --config.fusion.proper_marginals=True --config.experiment.groups='("4,0",)' \
    --config.experiment.method=ot-acts:sinkhorn --out=$out/heldout_vgg11_widths
  $py fuse.py --config=configs/fashion_resnet18.py --config.fusion.relative_epsilon=mean --config.fusion.epsilon=0.2 \
    "${ho[@]}" "${both[@]}" --config.num_parents=2 --config.experiment.method=cca,ot-acts:sinkhorn \
    --out=$out/heldout_resnet18_pair
  for m in vgg11_bn resnet18_bn; do
    $py fuse.py --config=configs/fashion_$m.py --config.fusion.relative_epsilon=mean --config.fusion.epsilon=0.2 \
      "${ho[@]}" "${both[@]}" --config.num_parents=2 --config.experiment.method=ot-acts:sinkhorn \
      --out=$out/heldout_${m}_pair
  done
else
  $py fuse.py "${mlp[@]}" "${both[@]}" --config.num_parents=2 --config.experiment.method=recommended,cca \
    --out=$out/test_mlp_pair
  $py fuse.py "${mlp[@]}" "${both[@]}" --config.num_parents=4 --config.experiment.method=recommended --out=$out/test_mlp_k4
  if [ -d runs/fashion_mlpnet8/parent_7 ]; then
    $py fuse.py "${mlp[@]}" "${both[@]}" --config.num_parents=8 --config.parents_dir=runs/fashion_mlpnet8 \
      --config.experiment.method=recommended --out=$out/test_mlp_k8
  fi
  if [ -d runs/fashion_mlpnet5/parent_4 ]; then
    $py fuse.py "${mlp[@]}" "${both[@]}" --config.num_parents=5 --config.parent_widths='(1,1,1,1,2)' \
      --config.parents_dir=runs/fashion_mlpnet5 --config.fusion.proper_marginals=True \
      --config.experiment.groups='("4,0",)' --config.experiment.method=recommended --out=$out/test_mlp_widths
  fi
  $py fuse.py "${both[@]}" --config.experiment.method=recommended --out=$out/test_digits_pair
  $py fuse.py "${both[@]}" --config.num_parents=4 --config.experiment.method=recommended --out=$out/test_digits_k4
  $py fuse.py "${vgg[@]}" "${both[@]}" --config.num_parents=2 --config.experiment.method=recommended,cca \
    --out=$out/test_vgg11_pair
  $py fuse.py "${vgg[@]}" "${both[@]}" --config.num_parents=4 --config.experiment.method=recommended,ot-acts:sinkhorn \
    --out=$out/test_vgg11_k4
  $py fuse.py --config=configs/fashion_resnet18.py "${both[@]}" --config.num_parents=2 \
    --config.experiment.method=recommended,cca --out=$out/test_resnet18_pair
  $py fuse.py "${vgg[@]}" "${both[@]}" --config.num_parents=6 --config.parent_widths='(1,1,1,1,2,2)' \
    --config.experiment.groups='("4,5",)' --config.experiment.method=recommended --out=$out/test_vgg11_wide_pair
  for m in vgg11_bn resnet18_bn; do
    $py fuse.py --config=configs/fashion_$m.py "${both[@]}" --config.num_parents=2 \
      --config.experiment.method=recommended --out=$out/test_${m}_pair
  done
fi

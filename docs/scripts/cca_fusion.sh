#!/usr/bin/env bash
# CCA Merge (method cca, config.cca; docs/RESULTS.md "CCA Merge"): the choice on held-out images, then the test set.
# Usage: bash docs/scripts/cca_fusion.sh heldout|test   (writes docs/results/cca/<split>_<run>/)
# heldout: the Fashion MLPNets retrained on 55,000 images (runs/fashion_mlpnet_55k: python train.py
#   --config=configs/fashion_mlpnet.py --config.num_parents=4 --config.data.max_train=55000
#   --config.parents_dir=runs/fashion_mlpnet_55k, 3 minutes) on 200 and 1,000 samples, the pair and four;
#   the shipped VGG11 pair at regularization 0.1, 0.5, 0.9 and four VGG11s; the BatchNorm-free ResNet18 pair
#   beside OT by activations (exact, and Sinkhorn 0.2 of the mean cost: the recommended conv-net rule), each +
#   REPAIR (its residual streams too). Every row evaluated on the 5,000 training images
#   no parent trained on (data.eval_split=heldout).
# test: the shipped parents on the test set: Fashion MLPNet pair (beside the former recommended method, OT by
#   weights with Sinkhorn 0.05 of the mean cost) and four, eight (runs/fashion_mlpnet8, when trained: python train.py
#   --config=configs/fashion_mlpnet.py --config.num_parents=8 --config.parents_dir=runs/fashion_mlpnet8, 5 minutes),
#   digits pair and four, VGG11 pair and four, BatchNorm-free ResNet18 pair (beside the recommended method).
#   MLP rows + REPAIR of hidden units and logits (CCA Merge's towards the parents' statistics moved by its maps).
set -euo pipefail
cd "$(dirname "$0")/../.."
split=${1:?heldout or test}
py=${PYTHON:-.venv/bin/python}
out=docs/results/cca
common=(--config.experiment.plots=False --config.experiment.many_method=)
repair=(--config.experiment.repair=True --config.experiment.repair_output=True)
mlp=(--config=configs/fashion_mlpnet.py)
if [ "$split" = heldout ]; then
  ho=(--config.data.eval_split=heldout)
  mlp55=("${mlp[@]}" --config.data.max_train=55000 --config.parents_dir=runs/fashion_mlpnet_55k "${ho[@]}")
  for ns in 200 1000; do
    $py fuse.py "${mlp55[@]}" "${common[@]}" "${repair[@]}" --config.experiment.method=cca --config.cca.num_samples=$ns \
      --config.num_parents=2 --out=$out/heldout_mlp_pair_s$ns
    $py fuse.py "${mlp55[@]}" "${common[@]}" "${repair[@]}" --config.experiment.method=cca --config.cca.num_samples=$ns \
      --config.num_parents=4 --out=$out/heldout_mlp_k4_s$ns
  done
  for r in 0.1 0.5 0.9; do
    $py fuse.py --config=configs/fashion_vgg11.py "${ho[@]}" "${common[@]}" "${repair[@]}" --config.experiment.method=cca \
      --config.cca.regularization=$r --config.num_parents=2 --out=$out/heldout_vgg11_pair_r$r
  done
  $py fuse.py --config=configs/fashion_vgg11.py "${ho[@]}" "${common[@]}" --config.experiment.method=cca \
    --config.num_parents=4 --out=$out/heldout_vgg11_k4
  $py fuse.py --config=configs/fashion_resnet18.py "${ho[@]}" "${common[@]}" "${repair[@]}" \
    --config.experiment.method=ot-acts:exact,ot-acts:sinkhorn,cca --config.fusion.relative_epsilon=mean \
    --config.fusion.epsilon=0.2 --config.num_parents=2 --out=$out/heldout_resnet18_pair
else
  sink=(--config.experiment.method=cca,ot-weights:sinkhorn --config.fusion.relative_epsilon=mean --config.fusion.epsilon=0.05)
  $py fuse.py "${mlp[@]}" "${common[@]}" "${repair[@]}" "${sink[@]}" --config.num_parents=2 --out=$out/test_mlp_pair
  $py fuse.py "${mlp[@]}" "${common[@]}" "${repair[@]}" --config.experiment.method=cca --config.num_parents=4 \
    --out=$out/test_mlp_k4
  if [ -d runs/fashion_mlpnet8/parent_7 ]; then
    $py fuse.py "${mlp[@]}" "${common[@]}" "${repair[@]}" --config.experiment.method=cca --config.num_parents=8 \
      --config.parents_dir=runs/fashion_mlpnet8 --out=$out/test_mlp_k8
  fi
  $py fuse.py "${common[@]}" "${repair[@]}" "${sink[@]}" --out=$out/test_digits_pair
  $py fuse.py "${common[@]}" "${repair[@]}" --config.experiment.method=cca --config.num_parents=4 --out=$out/test_digits_k4
  $py fuse.py --config=configs/fashion_vgg11.py "${common[@]}" --config.experiment.method=cca --config.num_parents=2 \
    --out=$out/test_vgg11_pair
  $py fuse.py --config=configs/fashion_vgg11.py "${common[@]}" --config.experiment.method=cca --config.num_parents=4 \
    --out=$out/test_vgg11_k4
  $py fuse.py --config=configs/fashion_resnet18.py "${common[@]}" "${repair[@]}" --config.experiment.method=recommended,cca \
    --config.num_parents=2 --out=$out/test_resnet18_pair
fi

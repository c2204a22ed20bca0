#!/usr/bin/env bash
# Issue 14: the ready-made Fashion-MNIST conv-net parents (checkpoints/fashion_<model>) fused with every method.
# Usage: bash docs/scripts/conv_fusion.sh vgg11|resnet18|vgg11_bn|resnet18_bn   (writes docs/results/fashion_<model>/<run>/)
# Runs: main (every one-shot method, each + REPAIR where the model allows it; loss-barrier plot), unitnorm (vgg11: the published command
# with unit-norm rows), finetune (the published method and vanilla averaging, each + 1 epoch of fine-tuning,
# 12% of the parents' 8). Sinkhorn: epsilon 0.05 of the mean cost, the setting chosen for the Fashion MLPNets
# (docs/RESULTS.md), not tuned on these parents or on any test set.
# BatchNorm models (*_bn): main keeps the statistics aligned with the plans (experiment.bn_stats=align) and adds
# REPAIR rows; recompute recomputes every BatchNorm's statistics on the 200 training samples after fusion
# (bn_stats=recompute): the three treatments of issue 14 on the same parents.
# k4 (vgg11, once parents 2 and 3 exist: python train.py --config=configs/fashion_vgg11.py --config.num_parents=4):
# the four parents fused onto parent 3 one-shot and by the iterative barycentres, each + REPAIR.
# recommended (every model): the recommended method on the pair (OT by activations, Sinkhorn 0.2 of the mean cost,
# + REPAIR of hidden units and logits; chosen on held-out images), k4_recommended likewise on four VGG11s.
# widths_recommended / wide_pair (vgg11, once parent 5, the second width-0.5 parent, exists: --config.num_parents=6
# --config.parent_widths='(1,1,1,1,2,2)'): the recommended method on 4 -> 0 and on the pair 4, 5; every method on 4, 5.
# widths (vgg11, once the double-width parent 4 exists: python train.py --config=configs/fashion_vgg11.py
# --config.num_parents=5 --config.parent_widths='(1,1,1,1,2)'): parent 4 (32..256 channels) fused into parent 0's
# widths by every OT variant (transport plans with proper marginals), each + REPAIR. resnet18 likewise with its
# double-width parent 2 (--config.num_parents=3 --config.parent_widths='(1,1,2)' --config.train.warmup_epochs=1:
# without the warm-up, at the pair's lr 0.05, it died in its first epoch), each + REPAIR (its residual streams included).
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:?vgg11 or resnet18}
py=${PYTHON:-.venv/bin/python}
cfg=configs/fashion_${model}.py
out=docs/results/fashion_${model}
sink=(--config.fusion.relative_epsilon=mean --config.fusion.epsilon=0.05)
# REPAIR of a BatchNorm-free ResNet corrects its residual streams sum by sum (repair.py, since 2026-12-07, night;
# before, fuse.py refused them and these rows were missing).
repair=True
$py fuse.py --config=$cfg --out=$out/main "${sink[@]}" --config.experiment.repair=$repair \
  --config.experiment.method=ot-weights,ot-weights:sinkhorn,ot-acts,ot-acts:sinkhorn,wm
if [[ $model == vgg11 ]]; then
  $py fuse.py --config=$cfg --out=$out/unitnorm --config.fusion.unit_norm_rows=True \
    --config.experiment.method=ot-weights --config.experiment.plots=False
fi
if [[ $model == *_bn ]]; then
  $py fuse.py --config=$cfg --out=$out/recompute "${sink[@]}" --config.experiment.bn_stats=recompute \
    --config.experiment.method=ot-weights,ot-weights:sinkhorn,ot-acts,ot-acts:sinkhorn,wm --config.experiment.plots=False
fi
# The recommended method (chosen on held-out images; REPAIR of hidden units and logits) on the pair.
$py fuse.py --config=$cfg --out=$out/recommended --config.experiment.method=recommended \
  --config.experiment.groups='("0,1",)' --config.experiment.plots=False
first=$([[ $model == vgg11* ]] && echo ot-weights || echo ot-acts)
$py fuse.py --config=$cfg --out=$out/finetune --config.experiment.method=$first \
  --config.experiment.finetune_epochs=1 --config.experiment.plots=False
if [[ $model == vgg11 && -d checkpoints/fashion_vgg11/parent_3 ]]; then
  $py fuse.py --config=$cfg --out=$out/k4 "${sink[@]}" --config.num_parents=4 --config.experiment.groups='("0,1,2,3",)' \
    --config.experiment.repair=True --config.experiment.plots=False --config.experiment.many_method="" \
    --config.experiment.method=ot-weights,ot-acts,ot-acts:sinkhorn,recommended,ot-many,ot-acts-many,wm-many
  $py fuse.py --config=$cfg --out=$out/k4_recommended --config.num_parents=4 --config.experiment.groups='("0,1,2,3",)' \
    --config.experiment.plots=False --config.experiment.method=recommended
fi
if [[ $model == vgg11 && -d checkpoints/fashion_vgg11/parent_4 ]]; then
  $py fuse.py --config=$cfg --out=$out/widths "${sink[@]}" --config.num_parents=5 --config.parent_widths='(1,1,1,1,2)' \
    --config.experiment.groups='("4,0",)' --config.fusion.proper_marginals=True --config.experiment.repair=True \
    --config.experiment.plots=False --config.experiment.many_method="" \
    --config.experiment.method=ot-weights,ot-weights:sinkhorn,ot-acts,ot-acts:sinkhorn
fi
if [[ $model == vgg11 && -d checkpoints/fashion_vgg11/parent_5 ]]; then
  # parent 5: the second width-0.5 parent (--config.num_parents=6 --config.parent_widths='(1,1,1,1,2,2)'): the
  # recommended method on 4 -> 0 and on the wide pair 4, 5; then every method on the wide pair.
  wide=(--config.num_parents=6 --config.parent_widths='(1,1,1,1,2,2)' --config.experiment.many_method="")
  $py fuse.py --config=$cfg --out=$out/widths_recommended "${wide[@]}" --config.experiment.groups='("4,0","4,5")' \
    --config.experiment.plots=False \
    --config.fusion.proper_marginals=True --config.experiment.method=recommended
  $py fuse.py --config=$cfg --out=$out/wide_pair "${wide[@]}" "${sink[@]}" --config.experiment.groups='("4,5",)' \
    --config.experiment.repair=True --config.experiment.method=ot-weights,ot-weights:sinkhorn,ot-acts,ot-acts:sinkhorn,recommended
fi
if [[ $model == resnet18 && -d checkpoints/fashion_resnet18/parent_2 ]]; then
  $py fuse.py --config=$cfg --out=$out/widths "${sink[@]}" --config.num_parents=3 --config.parent_widths='(1,1,2)' \
    --config.experiment.groups='("2,0",)' --config.fusion.proper_marginals=True --config.experiment.repair=True \
    --config.experiment.plots=False --config.experiment.many_method="" \
    --config.experiment.method=ot-weights,ot-weights:sinkhorn,ot-acts,ot-acts:sinkhorn,recommended
fi

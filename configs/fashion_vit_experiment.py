"""The Fashion-MNIST ViT experiment beyond the pair: K = 4 parents and a parent with a wider MLP (issue 12).

Uses the five parents of ``checkpoints/fashion_vit`` (parents 0-3 at ``configs/fashion_vit.py``'s shapes,
parent 4 with a double-width MLP, 256 hidden units; the stream and the heads must match for fusion) and makes
two tables: parents 0-3 fused onto parent 3 (each method, the iterative barycentre ``wm-many`` added for
K > 2), and parent 4 fused into parent 0's widths (OT plans; weight matching needs equal widths).

  python train.py --config=configs/fashion_vit_experiment.py    # trains the missing parents
  python fuse.py  --config=configs/fashion_vit_experiment.py
"""

import ml_collections

from configs import fashion_vit


def get_config() -> ml_collections.ConfigDict:
    """Returns the Fashion-MNIST ViT experiment config."""
    config = fashion_vit.get_config()
    config.workdir = "runs/fashion_vit_experiment"  # results
    config.num_parents = 5  # parents 0-3 at the default shapes, parent 4 with a wider MLP
    config.parent_widths = (1.0, 1.0, 1.0, 1.0, 2.0)  # parent 4: MLP 256 (vit's scale_width widens the MLP only)
    config.experiment.method = "ot-weights:sinkhorn,ot-acts,ot-acts:sinkhorn,ot-acts:orthogonal"  # the pair's best rows
    config.fusion.epsilon = 0.01  # Sinkhorn, relative to the mean cost (chosen on held-out images for the pair)
    config.fusion.relative_epsilon = "mean"  # scale-free epsilon
    config.fusion.proper_marginals = True  # the different-width table (equal widths: no effect)
    config.experiment.groups = ("0,1,2,3", "4,0")  # K = 4; the wider MLP -> parent 0's widths
    config.experiment.many_method = "wm-many"  # the barycentre row of docs/RESULTS.md (the default, recommended, would repeat ot-acts:orthogonal)
    config.experiment.finetune_epochs = 2  # the "+ fine-tune" rows: 10% of the parents' 20 epochs
    return config

"""The full Fashion-MNIST MLPNet experiment: one command, every table (docs/RESULTS.md).

Trains five parents (four at the paper's widths, one at double width) and
makes three tables: K = 2 parents, K = 4 parents, and the double-width parent
fused into parent 0's widths; each with OT fusion by weights and by activations,
exact and Sinkhorn, one-shot and after a short fine-tune.

  python train.py --config=configs/fashion_mlpnet_experiment.py
  python fuse.py  --config=configs/fashion_mlpnet_experiment.py
"""

import ml_collections

from configs import fashion_mlpnet


def get_config() -> ml_collections.ConfigDict:
    """Returns the Fashion-MNIST MLPNet experiment config."""
    config = fashion_mlpnet.get_config()
    config.workdir = "runs/fashion_mlpnet_experiment"  # parents and results
    config.parents_dir = None  # train its own five parents under the workdir
    config.num_parents = 5  # parents 0-3 at the paper's widths, parent 4 at double width
    config.parent_widths = (1.0, 1.0, 1.0, 1.0, 2.0)  # parent 4: 800-400-200
    config.experiment.method = "ot-weights,ot-weights:sinkhorn,ot-acts,ot-acts:sinkhorn"  # every OT variant
    config.fusion.normalize_cost = "none"  # the published commands
    config.fusion.epsilon = 0.05  # Sinkhorn, relative to the mean cost
    config.fusion.relative_epsilon = "mean"  # scale-free epsilon
    config.fusion.proper_marginals = True  # needed for the different-width table (equal widths: no effect)
    config.experiment.groups = ("0,1", "0,1,2,3", "4,0")  # K = 2, K = 4, double width -> parent 0's widths
    config.experiment.finetune_epochs = 2  # the "+ fine-tune" rows
    config.experiment.finetune_lr = 0.01  # the parents' lr
    return config

"""Fashion-MNIST padded to 32x32, ResNet18 with BatchNorm (bias-free), sized for a CPU.

``configs/fashion_resnet18.py`` with BatchNorm after every conv, as the paper's ResNet18 is
trained (the parents of ``checkpoints/fashion_resnet18_bn``:
``python train.py --config=configs/fashion_resnet18_bn.py``); same widths, data (55,000 training
images, 5,000 held out) and fusion methods, the paper's learning rate 0.1 (BatchNorm allows it).
After fusion the BatchNorm statistics are aligned with the plans (``experiment.bn_stats="align"``),
recomputed on training samples (``"recompute"``) or REPAIRed (``experiment.repair``):
docs/scripts/conv_fusion.sh compares the three.
"""

import ml_collections

from configs import fashion_resnet18


def get_config() -> ml_collections.ConfigDict:
    """Returns the Fashion-MNIST / ResNet18-BN config."""
    config = fashion_resnet18.get_config()
    config.workdir = "runs/fashion_resnet18_bn"  # results
    config.parents_dir = "checkpoints/fashion_resnet18_bn"  # the ready-made parents
    config.model.norm = True  # BatchNorm after each conv
    config.train.lr = 0.1  # the paper's ResNet18 rate
    return config

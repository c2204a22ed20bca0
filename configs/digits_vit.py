"""Offline and quick: scikit-learn's 8x8 digits, a tiny Vision Transformer (issue 12).

2 pre-LN blocks, embedding width 32, 4 heads of 8, MLP 64, 2x2 patches (16 patches + a class token);
AdamW with a warm-up and a cosine decay. Trains a parent in well under a minute on 2 CPU cores.
Parents go to ``runs/digits_vit/parents`` (none ship: ``python train.py --config=configs/digits_vit.py``).
"""

import ml_collections

from configs import default as default_lib


def get_config() -> ml_collections.ConfigDict:
    """Returns the digits / ViT config."""
    config = default_lib.get_config()
    config.workdir = "runs/digits_vit"  # results (parents in runs/digits_vit/parents)
    config.model.name = "vit"  # pre-LN ViT, class token, learned positions
    config.model.bias = True  # biases everywhere, as timm's ViTs
    config.model.depth = 2  # transformer blocks
    config.model.embed_dim = 32  # residual stream width
    config.model.num_heads = 4  # heads of 8
    config.model.mlp_dim = 64  # MLP ratio 2
    config.model.patch_size = 2  # 8x8 -> 4x4 patches: 17 tokens
    config.train.epochs = 40  # 1,497 images: 12 steps an epoch
    config.train.batch_size = 128  # examples per step
    config.train.optimizer = "adamw"  # the transformers' optimiser
    config.train.lr = 2e-3  # peak learning rate
    config.train.weight_decay = 0.05  # decoupled
    config.train.warmup_epochs = 4.0  # linear warm-up, then
    config.train.schedule = "cosine"  # cosine decay to zero
    config.experiment.method = "ot-weights,ot-acts,wm"  # OTFusion by weights, by activations, weight matching
    return config

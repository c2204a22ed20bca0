"""Interoperability with the original OTFusion (PyTorch).

``layouts`` converts array layouts; ``torch_checkpoints`` reads and writes the
original's ``torch.save`` checkpoints (torch is imported only when a file is
read or written: the optional extra ``otfusion-jax[torch]``); ``timm_vit``
converts timm's Vision Transformers to our ``vit`` and back.
"""

from otfusion_jax.interop import layouts, timm_vit, torch_checkpoints
from otfusion_jax.interop.torch_checkpoints import (
    TorchCheckpointError,
    is_torch_checkpoint,
    load_torch_checkpoint,
    save_torch_checkpoint,
)

__all__ = [
    "layouts",
    "timm_vit",
    "torch_checkpoints",
    "TorchCheckpointError",
    "is_torch_checkpoint",
    "load_torch_checkpoint",
    "save_torch_checkpoint",
]

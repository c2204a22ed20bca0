"""Interoperability with the original OTFusion (PyTorch).

``layouts`` converts array layouts; ``torch_checkpoints`` reads and writes the
original's ``torch.save`` checkpoints (torch is imported only when a file is
read or written: the optional extra ``otfusion-jax[torch]``); ``timm_vit``
and ``hf_vit`` convert timm's and Hugging Face's Vision Transformers to our
``vit`` and back (NumPy only: neither package is imported).
"""

from otfusion_jax.interop import hf_vit, layouts, timm_vit, torch_checkpoints
from otfusion_jax.interop.torch_checkpoints import (
    TorchCheckpointError,
    is_torch_checkpoint,
    load_torch_checkpoint,
    save_torch_checkpoint,
)

__all__ = [
    "hf_vit",
    "layouts",
    "timm_vit",
    "torch_checkpoints",
    "TorchCheckpointError",
    "is_torch_checkpoint",
    "load_torch_checkpoint",
    "save_torch_checkpoint",
]

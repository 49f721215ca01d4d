"""fusedlora: fused adapter layers (LoRA, C3A, sparse delta, multi-adapter serving).

    import fusedlora
    layer = fusedlora.FusedLinear(4096, 4096, device="cuda", dtype=torch.bfloat16)
    layer.add_lora("task", r=16, lora_alpha=32)
    y = layer(x)
"""
from . import multi, ops, reference
from .backend import backend_info, reset_dispatch, use_backend
from .module import FusedLinear
from .patch import patch_model, set_adapter
from .peft_io import from_peft, load_peft_adapter, save_peft_adapter
from .routing import adapter_id, adapter_ids, use_adapters

__all__ = [
    "FusedLinear", "adapter_id", "adapter_ids", "backend_info", "from_peft", "load_peft_adapter", "multi", "ops",
    "patch_model", "reference", "reset_dispatch", "save_peft_adapter", "set_adapter", "use_adapters",
    "use_backend",
]
__version__ = "0.1.0"

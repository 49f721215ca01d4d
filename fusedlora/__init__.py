"""fusedlora: fused low-rank adapter layers.

    import fusedlora
    layer = fusedlora.FusedLinear(4096, 4096, device="cuda", dtype=torch.bfloat16)
    layer.add_lora("task", r=16, lora_alpha=32)
    y = layer(x)
"""
from . import ops, reference
from .backend import backend_info, reset_dispatch
from .module import FusedLinear
from . import multi  # noqa: E402
from .routing import adapter_id, use_adapters
from .patch import patch_model, set_adapter
from .peft_io import from_peft, load_peft_adapter, save_peft_adapter

__all__ = ["FusedLinear", "backend_info", "ops", "reference", "reset_dispatch"]
__all__ += ["from_peft", "load_peft_adapter", "patch_model", "save_peft_adapter", "set_adapter"]
__all__ += ["adapter_id", "multi", "use_adapters"]
__version__ = "0.1.0"

"""fusedlora: fused low-rank adapter layers.

    import fusedlora
    layer = fusedlora.FusedLinear(4096, 4096, device="cuda", dtype=torch.bfloat16)
    layer.add_lora("task", r=16, lora_alpha=32)
    y = layer(x)
"""
from . import ops, reference
from .backend import backend_info, reset_dispatch
from .module import FusedLinear

__all__ = ["FusedLinear", "backend_info", "ops", "reference", "reset_dispatch"]
__version__ = "0.1.0"

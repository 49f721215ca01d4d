"""fusedlora: fused adapter layers (LoRA, C3A, sparse delta, multi-adapter serving).

    import fusedlora
    layer = fusedlora.FusedLinear(4096, 4096, device="cuda", dtype=torch.bfloat16)
    layer.add_lora("task", r=16, lora_alpha=32)
    y = layer(x)
"""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _source_tree_kernels() -> None:
    """Make ``fusedlora.kernels`` importable from a source checkout.

    setup.py maps ``fusedlora.kernels`` onto the top-level ``kernels/`` folder.
    A wheel copies it into place, and setuptools' newer editable installs add an
    import hook for the mapping; but a checkout on sys.path (running from the
    repository root, or an editable install that only adds a .pth, as older
    setuptools with --no-build-isolation does) has no ``fusedlora/kernels``.
    Load ``../kernels`` under that name then, and never as a top-level module.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    src = _os.path.join(_os.path.dirname(here), "kernels")
    if "fusedlora.kernels" in _sys.modules or _os.path.isdir(_os.path.join(here, "kernels")):
        return
    if _ilu.find_spec("fusedlora.kernels") is not None or not _os.path.isfile(_os.path.join(src, "__init__.py")):
        return
    spec = _ilu.spec_from_file_location("fusedlora.kernels", _os.path.join(src, "__init__.py"),
                                        submodule_search_locations=[src])
    module = _ilu.module_from_spec(spec)
    _sys.modules["fusedlora.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_source_tree_kernels()

from . import multi, ops, reference  # noqa: E402
from .backend import backend_info, reset_dispatch, use_backend  # noqa: E402
from .module import FusedLinear  # noqa: E402
from .multi_delta import add_multi_lora_  # noqa: E402
from .patch import patch_model, set_adapter  # noqa: E402
from .peft_convert import from_peft  # noqa: E402
from .peft_io import load_peft_adapter, save_peft_adapter  # noqa: E402
from .routing import adapter_id, adapter_ids, use_adapters  # noqa: E402

__all__ = [
    "FusedLinear", "add_multi_lora_", "adapter_id", "adapter_ids", "backend_info", "from_peft", "load_peft_adapter", "multi", "ops",
    "patch_model", "reference", "reset_dispatch", "save_peft_adapter", "set_adapter", "use_adapters",
    "use_backend",
]
__version__ = "0.1.0"

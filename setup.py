"""fusedlora: fused LoRA / C3A / sparse-delta layers for PyTorch (Triton + CUDA C++).

The Triton kernels live in the top-level folder ``kernels/`` of the source
tree but install as ``fusedlora.kernels``: a top-level ``kernels`` module
belongs to another package.

The CUDA extension (``fusedlora._C``) is built from ``csrc/`` when it has
sources, torch has CUDA and nvcc is found (``pip install --no-build-isolation``:
in pip's isolated build environment torch cannot be imported, and the extension is
then compiled on first use instead, fusedlora/cuda_ext.py). ``FUSEDLORA_BUILD_EXT``:
``0`` skips it, ``1`` makes any reason not to build it, or a failed build, an error;
unset (``auto``) a failed build is reported and the install goes on without it. Any
other value is an error. ``TORCH_CUDA_ARCH_LIST`` is honoured (default ``8.0;9.0+PTX``).
Beside the module goes ``_C.build.json``, what it was built from, which
fusedlora.cuda_ext checks before importing it (a stale build is not loaded).
"""
import glob
import importlib.util
import json
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent

# The build settings fusedlora.cuda_ext uses too, loaded by path: importing the package
# would import torch, which pip's isolated build environment does not have.
_spec = importlib.util.spec_from_file_location("_fusedlora_build_config",
                                               HERE / "fusedlora" / "build_config.py")
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)
build_mode, arch_list, nvcc_home = build_config.build_mode, build_config.arch_list, build_config.nvcc_home
source_digest, PREBUILT_RECORD = build_config.source_digest, build_config.PREBUILT_RECORD


def _say(msg):
    print(f"fusedlora setup.py: {msg}", file=sys.stderr)


def _skip(mode, why):
    if mode == "1":
        raise RuntimeError(f"FUSEDLORA_BUILD_EXT=1: {why}")
    _say(f"the CUDA extension is not built ahead of time: {why}; it is compiled on first use "
         "(fusedlora.cuda_ext.load()), fusedlora.backend_info() says whether it is there")
    return [], {}


def _cuda_extension():
    mode = build_mode()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if mode == "0" or not sources:
        return [], {}
    archs = arch_list()  # a bad value is an error in every mode
    try:
        import torch
    except ImportError:  # build isolation hides torch: pip install --no-build-isolation
        return _skip(mode, "torch is not importable at build time (pip install --no-build-isolation)")
    home = nvcc_home()
    if torch.version.cuda is None:
        return _skip(mode, f"torch {torch.__version__} is a CPU build")
    if home is None:
        return _skip(mode, build_config.no_nvcc_reason())
    os.environ["CUDA_HOME"] = str(home)  # before cpp_extension reads it
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cpp_extension.CUDA_HOME = str(home)

    class Build(BuildExtension):
        """Records what the module was built from beside it; in auto mode a failed build
        leaves no module (the linker writes into build/, nothing is copied) and the
        install goes on."""

        def run(self):
            try:
                super().run()
            except Exception as e:
                if mode == "1":
                    raise
                self.extensions = []  # nothing to copy or to install
                _say(f"building the CUDA extension failed ({type(e).__name__}: {str(e)[-1500:]}); "
                     "installing without it (FUSEDLORA_BUILD_EXT=1 makes this an error)")
                return
            record = json.dumps({"sources": source_digest(HERE / "csrc"), "torch": torch.__version__,
                                 "python": sys.implementation.cache_tag, "arch_list": archs,
                                 "cuda_home": str(home)}, indent=1)
            inplace = self.inplace
            for ext in self.extensions:
                for self.inplace in (False, True):
                    path = Path(self.get_ext_fullpath(ext.name))
                    if path.exists():
                        (path.parent / PREBUILT_RECORD).write_text(record + "\n")
            self.inplace = inplace

    # the flags of the first-use build too (libstdc++ shared, as torch uses it: build_config)
    ext = CUDAExtension("fusedlora._C", sources,
                        extra_compile_args={"cxx": list(build_config.CFLAGS), "nvcc": list(build_config.CUDA_CFLAGS)},
                        extra_link_args=list(build_config.LINK_FLAGS))
    _say(f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={archs} with {home}/bin/nvcc")
    return [ext], {"build_ext": Build}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="fusedlora",
    version="0.1.0",
    description="Fused low-rank adapter layers (LoRA, C3A, sparse delta, multi-adapter) for PyTorch",
    packages=["fusedlora", "fusedlora.kernels"],
    package_dir={"fusedlora": "fusedlora", "fusedlora.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'", "ninja"],
    extras_require={"test": ["pytest>=7", "peft>=0.13"], "bench": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

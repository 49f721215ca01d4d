"""Triton kernels of fusedlora.

Installed as ``fusedlora.kernels`` (see setup.py): never import it as a
top-level ``kernels`` package. Kernels here are pure: pointers, shapes,
strides and constexpr tile sizes in; validation and allocation live in
``fusedlora.launch``.
"""

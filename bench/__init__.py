"""Microbenchmarks of fusedlora: ``python bench/run.py`` or ``python -m fusedlora bench``.

Each adapter path is a module here (``lora.py``, ``c3a.py``, ``sparse.py``, ``switch.py``,
``multi.py``, ``decode.py``) that
defines ``cases(opts)``; ``run.py`` finds it by name. See docs/benchmarks.md.
"""

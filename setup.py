"""The one compiled part of ltmpctl: `ltmpctl._kernels` (plain C, no torch headers; see ltmpctl/_kernels.c).

Optional: where no C compiler or Python headers are found, the install goes on without it and every forward takes
the pure-torch path, which gives the same values (tests/test_kernels.py), only slower at small batches.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "ltmpctl._kernels",
    sources=["ltmpctl/_kernels.c"],
    # Exactness: no reassociation and no fused multiply-add, so every rounding is the torch code's.
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-pthread"],
    extra_link_args=["-pthread"],  # batched steps split their images over threads
    optional=True,
)])

"""Packaging: the `deepmlf_fast` package, and the Triton kernels, which live in the top-level
`kernels/` folder as the package `kernels/deepmlf_kernels/` and import as `deepmlf_kernels`
(import name = folder name; a bare top-level `kernels` would clash with an unrelated package
that transformers probes for)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["deepmlf_fast", "deepmlf_fast.*"]) + ["deepmlf_kernels"],
    package_dir={"deepmlf_kernels": "kernels/deepmlf_kernels"},
)

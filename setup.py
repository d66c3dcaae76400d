"""Packaging shim: installs the top-level `kernels/` folder as `deepmlf_fast.kernels`.

`transformers` probes for an unrelated package called `kernels`, so the folder must never
be importable under that name.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["deepmlf_fast", "deepmlf_fast.*"]) + ["deepmlf_fast.kernels"],
    package_dir={"deepmlf_fast.kernels": "kernels"},
)

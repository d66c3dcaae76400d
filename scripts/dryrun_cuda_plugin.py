"""pytest plugin of `benchmarks/gpu_check.sh --dry-run`: collect as on a CUDA machine, without one.

The GPU check's selection depends on the device: `--bench-device cuda` needs a CUDA device and
picks the CUDA step table (`shapes.step_configs`), and the test conftests leave the Triton
interpreter off when CUDA is present. To collect exactly what the device will run, this plugin
makes torch report one CUDA device, named `DEVICE_NAME`, before any conftest is imported.

Nothing may execute against that fake device: the plugin refuses any session that is not
`--collect-only`. Load it with `-p dryrun_cuda_plugin` (scripts/ on PYTHONPATH).
"""

from __future__ import annotations

import pytest
import torch

DEVICE_NAME = "dry run (no GPU)"

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_name = lambda device=None: DEVICE_NAME


def pytest_configure(config):
    if not config.option.collectonly:
        raise pytest.UsageError("dryrun_cuda_plugin fakes a CUDA device: use it with --collect-only only")

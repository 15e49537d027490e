"""Shared fixtures. The CPU engine's import shim must be active before anything imports sglang:
``make test`` exports SGLANG_USE_CPU_ENGINE=1 (the .pth installs the shim at start-up); a bare
``pytest`` on a CPU machine gets the same here."""

from __future__ import annotations

import os

import pytest
import torch

from sglang_kvcomm import cpu_shim

if not torch.cuda.is_available():
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    cpu_shim.install()


@pytest.fixture(scope="session")
def smollm2_dir():
    from sglang_kvcomm.assets.models import model_dir

    return model_dir("smollm2")

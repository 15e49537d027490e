"""Shared fixtures. The CPU engine's import shim must be active before anything imports sglang:
``make test`` exports SGLANG_USE_CPU_ENGINE=1 (the .pth installs the shim at start-up); a bare
``pytest`` on a CPU machine gets the same here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from sglang_kvcomm import cpu_shim

if not torch.cuda.is_available():
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    cpu_shim.install()
    # Triton kernels run on CPU tensors in its interpreter. It must be on before anything
    # imports triton (transformers and torch do): jit functions pick their mode when defined.
    os.environ["TRITON_INTERPRET"] = "1"

# The benchmark scripts' modules (hf_kv, fidelity, report) are tested too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="session")
def smollm2_dir():
    from sglang_kvcomm.assets.models import model_dir

    return model_dir("smollm2")


@pytest.fixture(scope="session")
def hf_models():
    """Real models loaded with transformers (fp32), keyed like sglang_kvcomm.assets.models."""
    from hf_kv import HFModel

    from sglang_kvcomm.assets.models import model_dir

    loaded = {}

    def get(key: str) -> HFModel:
        if key not in loaded:
            loaded[key] = HFModel(model_dir(key))
        return loaded[key]

    return get


KVCOMM_ARGS = [
    "--kvcomm",
    "--kvcomm-threshold",
    "0.5",
    "--kvcomm-max-anchors",
    "8",
    "--kvcomm-window",
    "3",
    "--enable-metrics",  # the extension's counters on /metrics too (test_e2e_reuse)
]


@pytest.fixture(scope="session")
def servers(smollm2_dir, tmp_path_factory):
    """A stock server and a --kvcomm server, side by side on 127.0.0.1 (stopped by PID)."""
    from sglang_kvcomm.server_process import ServerProcess, serving

    logs = tmp_path_factory.mktemp("server-logs")
    stock = ServerProcess(smollm2_dir, [], log_path=logs / "stock.log")
    kvcomm = ServerProcess(smollm2_dir, KVCOMM_ARGS, log_path=logs / "kvcomm.log")
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # servers run as in production
    try:
        with serving(stock, kvcomm):
            if interpret is not None:
                os.environ["TRITON_INTERPRET"] = interpret
            yield {"stock": stock, "kvcomm": kvcomm}
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret

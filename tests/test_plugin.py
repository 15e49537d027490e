"""The plugin is found through its entry point and, once loaded, wires itself into SGLang."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points


def test_entry_point_is_discovered():
    found = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "kvcomm"]
    assert len(found) == 1
    assert found[0].value == "sglang_kvcomm.plugin:register"
    assert found[0].dist.name == "sglang-kvcomm"
    from sglang_kvcomm.plugin import register

    assert found[0].load() is register


def test_sglang_plugin_loader_registers_backend_and_flags():
    # A fresh interpreter: load_plugins() patches SGLang for the whole process.
    code = """
import argparse
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.mem_cache.registry import get_radix_cache_factory
from sglang.srt.server_args import ServerArgs
from sglang_kvcomm.plugin import _build_tree_cache
assert get_radix_cache_factory("kvcomm") is _build_tree_cache
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
options = {o for a in parser._actions for o in a.option_strings}
print(sorted(o for o in options if o.startswith("--kvcomm")))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, SGLANG_USE_CPU_ENGINE="1"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(
        [
            "--kvcomm",
            "--kvcomm-exact-final",
            "--kvcomm-max-anchors",
            "--kvcomm-max-memory-mb",
            "--kvcomm-placeholder",
            "--kvcomm-tail-tokens",
            "--kvcomm-threshold",
            "--kvcomm-window",
        ]
    )

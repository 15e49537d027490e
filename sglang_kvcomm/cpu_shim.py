"""Stand-ins for the two modules stock sglang imports that PyPI cannot provide on a CPU machine.

sglang 0.5.17 imports ``torchvision`` at module level (``sglang.srt.utils.common``) and, with
``SGLANG_USE_CPU_ENGINE=1``, a few names from ``sgl_kernel``. The PyPI torchvision wheel needs a
CUDA torch and the CPU build of sgl_kernel is not on PyPI; the text-only CPU path never calls
either. This finder, appended to ``sys.meta_path`` (so a real installed module always wins),
serves placeholder modules for them. Any attribute of a placeholder is a callable that raises a
clear error when used, so a code path that really needs the module fails loudly, not silently.

It is installed at interpreter start by ``sglang_kvcomm_cpu_shim.pth`` (sglang imports these
modules before any plugin runs, in the server and in every spawned scheduler process), and only
when ``SGLANG_USE_CPU_ENGINE=1``: on a GPU machine it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

STUBBED_PACKAGES = ("torchvision", "sgl_kernel")
_ENV_FLAG = "SGLANG_USE_CPU_ENGINE"


class _Unavailable:
    """A name a placeholder module hands out; using it explains why it is missing."""

    def __init__(self, qualname: str) -> None:
        self._qualname = qualname

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            f"{self._qualname} is not available: sglang-kvcomm's CPU shim stands in for "
            f"{self._qualname.split('.')[0]} ({_ENV_FLAG}=1); install the real package to use it"
        )

    def __getattr__(self, name: str) -> _Unavailable:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(f"{self._qualname}.{name}")

    def __repr__(self) -> str:
        return f"<unavailable {self._qualname}>"


class _PlaceholderModule(types.ModuleType):
    # A valid, lowest version: transformers parses it when it probes for torchvision and then
    # picks its non-torchvision code paths.
    __version__ = "0.0.0+kvcomm.cpu.shim"
    __kvcomm_cpu_shim__ = True

    def __getattr__(self, name: str) -> _Unavailable:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(f"{self.__name__}.{name}")


class _ShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 (importlib protocol)
        if fullname.split(".", 1)[0] not in STUBBED_PACKAGES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def is_active() -> bool:
    return any(isinstance(finder, _ShimFinder) for finder in sys.meta_path)


def install() -> bool:
    """Append the finder when running the CPU engine; returns whether the shim is active."""
    if os.environ.get(_ENV_FLAG) != "1":
        return False
    if not is_active():
        sys.meta_path.append(_ShimFinder())
    return True

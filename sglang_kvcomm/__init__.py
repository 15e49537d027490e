"""sglang-kvcomm: KVCOMM cross-context KV-cache reuse for multi-agent programs on SGLang.

Importing this package must stay cheap and must not import sglang: the CPU import shim
(``cpu_shim``) is loaded from a ``.pth`` file at every interpreter start.
"""

__version__ = "0.1.0"

"""The extension's configuration: its command-line flags, their validation, and their transport.

Flags are parsed in the launcher; scheduler processes are spawned and inherit the environment,
so the launcher hands the validated configuration to them as JSON in ``SGLANG_KVCOMM_CONFIG``.
This module does not import sglang.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from radix_anchor.estimate import PLACEHOLDER_ESTIMATES

ENV_VAR = "SGLANG_KVCOMM_CONFIG"
BACKEND_NAME = "kvcomm"


class KVCommConfigError(ValueError):
    """A bad ``--kvcomm*`` value or combination; the message names the flag."""


@dataclass(frozen=True)
class KVCommConfig:
    """KVCOMM's serving knobs (paper defaults). Validated on construction."""

    threshold: float = 0.2  # the gate's limit (radix_anchor/gate.py)
    max_anchors: int = 20  # V: anchor pool capacity per placeholder
    window: int = 5  # W: eviction drops the least activated of the W oldest anchors
    max_memory_mb: int = 1024  # bound on base KV + anchors held per scheduler
    tail_tokens: int | None = None  # prompt tokens a reuse leaves to prefill; None: per device
    exact_final: int = 64  # tokens of the final fixed segment prefilled exactly
    placeholder: str = "token"  # the placeholder offset estimate (radix_anchor.estimate)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise KVCommConfigError(f"--kvcomm-threshold must be in [0, 1], got {self.threshold}")
        if self.max_anchors < 2:
            raise KVCommConfigError(
                f"--kvcomm-max-anchors must be >= 2 (the gate needs two anchors), "
                f"got {self.max_anchors}"
            )
        if not 1 <= self.window <= self.max_anchors:
            raise KVCommConfigError(
                f"--kvcomm-window must be in [1, --kvcomm-max-anchors={self.max_anchors}], "
                f"got {self.window}"
            )

        if self.tail_tokens is not None and self.tail_tokens < 1:
            raise KVCommConfigError(f"--kvcomm-tail-tokens must be >= 1, got {self.tail_tokens}")
        if self.exact_final < 0:
            raise KVCommConfigError(f"--kvcomm-exact-final must be >= 0, got {self.exact_final}")
        if self.placeholder not in PLACEHOLDER_ESTIMATES:
            raise KVCommConfigError(
                f"--kvcomm-placeholder must be one of {', '.join(PLACEHOLDER_ESTIMATES)}, "
                f"got {self.placeholder!r}"
            )
        if self.max_memory_mb < 1:
            raise KVCommConfigError(
                f"--kvcomm-max-memory-mb must be >= 1, got {self.max_memory_mb}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> KVCommConfig:
        """The launcher's configuration, or the defaults (e.g. ``--radix-cache-backend kvcomm``
        used directly, or the offline Engine)."""
        raw = environ.get(ENV_VAR)
        if not raw:
            return cls()
        try:
            values = json.loads(raw)
            known = {f.name for f in fields(cls)}
            unknown = set(values) - known
            if unknown:
                raise KVCommConfigError(f"{ENV_VAR} has unknown keys {sorted(unknown)}")
            return cls(**values)
        except (json.JSONDecodeError, TypeError) as exc:
            raise KVCommConfigError(f"{ENV_VAR} is not a valid configuration: {exc}") from exc


@dataclass(frozen=True)
class _Flag:
    name: str  # KVCommConfig field
    option: str
    type: type
    help: str


_FLAGS = (
    _Flag(
        "threshold",
        "--kvcomm-threshold",
        float,
        "The gate's limit in [0, 1]: a shared segment is reused when the relative error of "
        "its estimate, predicted from the errors its pool measured on its own anchors, is at "
        "most this (1: every warm pool reuses; lower is stricter). With "
        "--kvcomm-placeholder index it is the paper's entropy gamma.",
    ),
    _Flag(
        "max_anchors", "--kvcomm-max-anchors", int, "Anchor pool capacity V per placeholder (>= 2)."
    ),
    _Flag(
        "window",
        "--kvcomm-window",
        int,
        "Eviction window W (1 <= W <= V): when a pool is full, the least "
        "activated of its W oldest anchors is dropped.",
    ),
    _Flag(
        "max_memory_mb",
        "--kvcomm-max-memory-mb",
        int,
        "Memory bound (MiB, per scheduler) for the base KV of shared contents and the anchors; "
        "past it the least recently used bases, then anchors, are dropped.",
    ),
    _Flag(
        "tail_tokens",
        "--kvcomm-tail-tokens",
        int,
        "Prompt tokens a reuse leaves to prefill (>= 1). Unset: 4 on CUDA (a prefill of 2 or "
        "more tokens runs as a CUDA graph, 1 token runs eagerly and is ~6 ms slower on an "
        "H100), 1 elsewhere.",
    ),
    _Flag(
        "exact_final",
        "--kvcomm-exact-final",
        int,
        "Tokens of the prompt's final fixed segment (the lead-in to the answer, after the last "
        "shared segment) prefilled exactly instead of estimated (>= 0; 0: estimate it all, as "
        "the paper). Recomputing it halves the next token's KL at about no GPU cost.",
    ),
    _Flag(
        "placeholder",
        "--kvcomm-placeholder",
        str,
        "Placeholder offset estimate: 'token' (the mean offset of the same token id across the "
        "anchor pool, else of the same index) or 'index' (the paper's: anchors at least as "
        "long as the content, weighted per index).",
    ),
)

# Server-args fields that pick a different cache, or no cache: --kvcomm cannot honour them.
_CONFLICTS = {
    "disable_radix_cache": "--disable-radix-cache",
    "enable_hierarchical_cache": "--enable-hierarchical-cache",
    "enable_lmcache": "--enable-lmcache",
    "enable_flexkv": "--enable-flexkv",
}


# Parallel and speculative modes the reuse path does not serve yet: each refused by its flag.
# A tensor-parallel rank sees only its KV-head shard, so ranks would gate on different KV and
# could disagree (hang, or serve wrong KV); the others change who runs the prefix match.
_UNSUPPORTED = (
    ("tp_size", "--tp-size", lambda v: v not in (None, 1)),
    ("pp_size", "--pp-size", lambda v: v not in (None, 1)),
    ("enable_dp_attention", "--enable-dp-attention", bool),
    ("speculative_algorithm", "--speculative-algorithm", lambda v: v is not None),
    ("disaggregation_mode", "--disaggregation-mode", lambda v: v not in (None, "null")),
)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--kvcomm`` and its options to SGLang's server parser."""
    group = parser.add_argument_group(
        "KVCOMM (sglang-kvcomm)",
        "Cross-context KV-cache reuse for multi-agent programs (KVCOMM, NeurIPS 2025).",
    )
    group.add_argument(
        "--kvcomm",
        action="store_true",
        help="Enable KVCOMM: selects the 'kvcomm' radix-cache backend, which reuses the KV of "
        "text shared across agent prompts behind different prefixes.",
    )
    defaults = KVCommConfig()
    for flag in _FLAGS:
        default = getattr(defaults, flag.name)
        group.add_argument(
            flag.option,
            type=flag.type,
            default=None,
            metavar=flag.type.__name__.upper(),
            help=f"{flag.help}{'' if default is None else f' Default: {default}.'} Needs --kvcomm.",
        )


def config_from_cli_args(args: argparse.Namespace) -> KVCommConfig | None:
    """Validate the parsed flags and select the backend on ``args``; None without --kvcomm.

    Raises KVCommConfigError with a one-line message naming the offending flag.
    """
    given = {f.name: getattr(args, f"kvcomm_{f.name}", None) for f in _FLAGS}
    if not getattr(args, "kvcomm", False):
        stray = [f.option for f in _FLAGS if given[f.name] is not None]
        if stray:
            raise KVCommConfigError(f"{stray[0]} needs --kvcomm")
        return None
    for field, option in _CONFLICTS.items():
        if getattr(args, field, False):
            raise KVCommConfigError(f"--kvcomm cannot be combined with {option}")
    for field, option, unsupported in _UNSUPPORTED:
        value = getattr(args, field, None)
        if unsupported(value):
            raise KVCommConfigError(f"--kvcomm does not support {option} {value} yet")
    backend = getattr(args, "radix_cache_backend", None)
    if backend not in (None, BACKEND_NAME):
        raise KVCommConfigError(
            f"--kvcomm selects --radix-cache-backend={BACKEND_NAME}; got {backend!r}"
        )
    config = KVCommConfig(**{k: v for k, v in given.items() if v is not None})
    args.radix_cache_backend = BACKEND_NAME
    return config

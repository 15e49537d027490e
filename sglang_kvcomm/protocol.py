"""The wire protocol for shared segments, parsed and validated in one place.

A request marks the token spans of its shared content (a question, a passage, another agent's
answer) so the server can reuse their KV across prompts. On sglang 0.5.17 the metadata travels
as flat keys of ``sampling_params.custom_params`` (whose values may only be scalars, lists of
scalars or flat objects) in a ``/generate`` request with ``input_ids``::

    "custom_params": {
        "kvcomm_mode": "approx",              # approx (default) | exact | off
        "kvcomm_agent": "solver",             # optional, for metrics
        "kvcomm_spans": [12, 80, 95, 140],    # [start, end) pairs into input_ids, ordered
    }

The server keys what it keeps for a shared content (its base KV) by the span's token ids, never
by a client-chosen name, so reused KV always belongs to exactly these tokens.

``approx`` allows estimated KV for the spans; ``exact`` uses only exact prefix reuse; ``off``
disables the extension for the request. Malformed metadata raises ``ProtocolError`` with a
message meant for the client (the server answers 400).

The answer's ``meta_info["kvcomm"]`` is ``[report]``: what the server did with the request
(``decision``, fallback ``reason``, token counts, ``overhead_ms``). SGLang's customized info
holds one value per request of a batch, hence the list; ``report_from_meta`` unwraps it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["approx", "exact", "off"]
MODES: tuple[Mode, ...] = ("approx", "exact", "off")
PREFIX = "kvcomm_"
MODE, AGENT, SPANS = (PREFIX + k for k in ("mode", "agent", "spans"))
_KEYS = (MODE, AGENT, SPANS)
META_KEY = "kvcomm"
_MAX_NAME = 256


class ProtocolError(ValueError):
    """Malformed kvcomm metadata; the message says what and where."""


@dataclass(frozen=True)
class SharedSegment:
    start: int  # first token, index into input_ids
    end: int  # one past the last token

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class KVCommRequest:
    mode: Mode = "approx"
    agent: str | None = None
    segments: tuple[SharedSegment, ...] = ()


def from_custom_params(custom_params: Any, num_input_ids: int | None) -> KVCommRequest | None:
    """The request's kvcomm metadata, or None for a request without any.

    ``num_input_ids``: the length of the request's ``input_ids``, None when it sent text.
    """
    if custom_params is None:
        return None
    if not isinstance(custom_params, Mapping):
        raise ProtocolError("sampling_params.custom_params must be an object")
    present = {k: v for k, v in custom_params.items() if str(k).startswith(PREFIX)}
    if not present:
        return None
    unknown = sorted(set(present) - set(_KEYS))
    if unknown:
        raise ProtocolError(f"custom_params has unknown keys {unknown}; known: {list(_KEYS)}")
    mode = present.get(MODE, "approx")
    if mode not in MODES:
        raise ProtocolError(f"custom_params.{MODE} must be one of {list(MODES)}, got {mode!r}")
    agent = present.get(AGENT)
    if AGENT in present and not _is_name(agent):  # null too: a key given needs a value
        raise ProtocolError(f"custom_params.{AGENT} must be a string of at most {_MAX_NAME} chars")
    segments = _segments(present.get(SPANS, []), num_input_ids)
    return KVCommRequest(mode=mode, agent=agent, segments=segments)


def _segments(spans: Any, num_input_ids: int | None) -> tuple[SharedSegment, ...]:
    where = f"custom_params.{SPANS}"
    if not isinstance(spans, list) or len(spans) % 2:
        raise ProtocolError(f"{where} must be a flat list of start, end pairs")
    for i, value in enumerate(spans):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{where}[{i}] must be an integer, got {value!r}")
    if spans and num_input_ids is None:
        raise ProtocolError(f"{where} index input_ids: send input_ids, not text")
    pairs = list(zip(spans[0::2], spans[1::2], strict=True))
    segments = []
    for n, (start, end) in enumerate(pairs):
        if not 0 <= start < end:
            raise ProtocolError(
                f"{where}: span {n} must satisfy 0 <= start < end, got [{start}, {end})"
            )
        if num_input_ids is not None and end > num_input_ids:
            raise ProtocolError(
                f"{where}: span {n} ends at {end}, past the {num_input_ids} input_ids"
            )
        if segments and start < segments[-1].end:
            raise ProtocolError(
                f"{where}: span {n} starts at {start}, before the end of span "
                f"{n - 1} ({segments[-1].end}): spans must be in order and "
                "disjoint"
            )
        segments.append(SharedSegment(start, end))
    return tuple(segments)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= _MAX_NAME


def report_from_meta(meta_info: Mapping[str, Any]) -> dict:
    """The server's report in a response's meta info; ``{}`` from a server without --kvcomm."""
    return dict((meta_info.get(META_KEY) or [{}])[0] or {})

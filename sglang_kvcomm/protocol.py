"""The wire protocol for shared segments, parsed and validated in one place.

A request marks the token spans of its shared content (a question, a passage, another agent's
answer) so the server can reuse their KV across prompts. On sglang 0.5.17 the metadata travels
in ``sampling_params.custom_params["kvcomm"]`` of a ``/generate`` request with ``input_ids``::

    {"mode": "approx",                       # approx (default) | exact | off
     "agent": "solver",                      # optional, for metrics
     "segments": [{"start": 12, "end": 80,   # [start, end) in input_ids, in order, disjoint
                   "id": "question-17"}]}    # optional content id (default: the tokens)

``approx`` allows estimated KV for the segments; ``exact`` uses only exact prefix reuse;
``off`` disables the extension for the request. Malformed metadata raises ``ProtocolError``
with a message meant for the client (the server answers 400).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["approx", "exact", "off"]
MODES: tuple[Mode, ...] = ("approx", "exact", "off")
CUSTOM_PARAMS_KEY = "kvcomm"
_KEYS = {"mode", "agent", "segments"}
_SEGMENT_KEYS = {"start", "end", "id"}
_MAX_NAME = 256


class ProtocolError(ValueError):
    """Malformed kvcomm metadata; the message says what and where."""


@dataclass(frozen=True)
class SharedSegment:
    start: int  # first token, index into input_ids
    end: int  # one past the last token
    content_id: str | None = None

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
    if CUSTOM_PARAMS_KEY not in custom_params:
        return None
    return parse(custom_params[CUSTOM_PARAMS_KEY], num_input_ids)


def parse(meta: Any, num_input_ids: int | None) -> KVCommRequest:
    where = f"custom_params.{CUSTOM_PARAMS_KEY}"
    if not isinstance(meta, Mapping):
        raise ProtocolError(f"{where} must be an object, got {type(meta).__name__}")
    unknown = set(meta) - _KEYS
    if unknown:
        raise ProtocolError(f"{where} has unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    mode = meta.get("mode", "approx")
    if mode not in MODES:
        raise ProtocolError(f"{where}.mode must be one of {list(MODES)}, got {mode!r}")
    agent = meta.get("agent")
    if agent is not None and (not isinstance(agent, str) or len(agent) > _MAX_NAME):
        raise ProtocolError(f"{where}.agent must be a string of at most {_MAX_NAME} characters")
    raw_segments = meta.get("segments", [])
    if not isinstance(raw_segments, list):
        raise ProtocolError(f"{where}.segments must be a list")
    if raw_segments and num_input_ids is None:
        raise ProtocolError(f"{where}.segments index input_ids: send input_ids, not text")
    segments = tuple(
        _segment(raw, f"{where}.segments[{i}]", num_input_ids) for i, raw in enumerate(raw_segments)
    )
    for i in range(1, len(segments)):
        if segments[i].start < segments[i - 1].end:
            raise ProtocolError(
                f"{where}.segments[{i}] starts at {segments[i].start}, before the end of "
                f"segments[{i - 1}] ({segments[i - 1].end}): segments must be in order and disjoint"
            )
    return KVCommRequest(mode=mode, agent=agent, segments=segments)


def _segment(raw: Any, where: str, num_input_ids: int | None) -> SharedSegment:
    if not isinstance(raw, Mapping):
        raise ProtocolError(f"{where} must be an object with start and end")
    unknown = set(raw) - _SEGMENT_KEYS
    if unknown:
        raise ProtocolError(f"{where} has unknown keys {sorted(unknown)}")
    for key in ("start", "end"):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{where}.{key} must be an integer, got {value!r}")
    start, end = raw["start"], raw["end"]
    if not 0 <= start < end:
        raise ProtocolError(f"{where} must satisfy 0 <= start < end, got [{start}, {end})")
    if num_input_ids is not None and end > num_input_ids:
        raise ProtocolError(f"{where} ends at {end}, past the {num_input_ids} input_ids")
    content_id = raw.get("id")
    if content_id is not None and (not isinstance(content_id, str) or len(content_id) > _MAX_NAME):
        raise ProtocolError(f"{where}.id must be a string of at most {_MAX_NAME} characters")
    return SharedSegment(start, end, content_id)

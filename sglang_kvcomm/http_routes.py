"""What the extension adds to SGLang's FastAPI app when ``--kvcomm`` is on: ``/kvcomm/stats``,
and a check that refuses malformed kvcomm metadata of a streamed ``/generate`` before the stream
opens (SGLang validates a streamed request inside the stream, so a bad one would get ``200``
and then an error event)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from sglang_kvcomm.protocol import ProtocolError, from_custom_params

STATS_PATH = "/kvcomm/stats"
_GENERATE_PATH = "/generate"

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def kvcomm_stats() -> JSONResponse:
    """Configuration and counters of the kvcomm cache, read from the scheduler(s)."""
    from sglang.srt.entrypoints.http_server import get_global_state

    states = await get_global_state().tokenizer_manager.get_internal_state()
    reports = [state.get("kvcomm") for state in states]
    if any(report is None for report in reports):
        return JSONResponse({"error": "the kvcomm cache backend is not active"}, 503)
    if len(reports) == 1:
        return JSONResponse(reports[0])
    return JSONResponse({"dp_ranks": reports})


def streamed_metadata_error(body: bytes) -> str | None:
    """The ProtocolError message for a streamed ``/generate`` body with malformed kvcomm
    metadata, or None (not streamed, no metadata, or a body SGLang refuses on its own)."""
    if b"custom_params" not in body:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not obj.get("stream"):
        return None
    ids = obj.get("input_ids")
    batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
    items = len(ids) if batch else 1
    sampling = obj.get("sampling_params")
    for i in range(items):
        params = sampling[i] if isinstance(sampling, list) and i < len(sampling) else sampling
        if not isinstance(params, dict):
            continue
        item_ids = ids[i] if batch else ids
        try:
            from_custom_params(
                params.get("custom_params"), len(item_ids) if isinstance(item_ids, list) else None
            )
        except ProtocolError as exc:
            return str(exc)
    return None


class StreamedMetadataCheck:
    """ASGI middleware: buffers a ``/generate`` body, answers 400 (SGLang's error body) when
    ``streamed_metadata_error`` finds a problem, else replays the body to the app."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != _GENERATE_PATH:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        error = streamed_metadata_error(body)
        if error is not None:
            await JSONResponse({"error": {"message": error}}, 400)(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def add_routes(app: FastAPI) -> None:
    if any(getattr(route, "path", None) == STATS_PATH for route in app.routes):
        return
    app.add_api_route(STATS_PATH, kvcomm_stats, methods=["GET"])
    app.add_middleware(StreamedMetadataCheck)

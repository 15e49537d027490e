"""HTTP routes the extension adds to SGLang's FastAPI app when ``--kvcomm`` is on."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

STATS_PATH = "/kvcomm/stats"


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


def add_routes(app: FastAPI) -> None:
    if any(getattr(route, "path", None) == STATS_PATH for route in app.routes):
        return
    app.add_api_route(STATS_PATH, kvcomm_stats, methods=["GET"])

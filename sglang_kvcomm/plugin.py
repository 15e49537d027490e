"""SGLang plugin entry point (group ``sglang.srt.plugins``) and every hook into SGLang.

SGLang runs ``register`` in the launcher before the command line is parsed and again at the start
of each scheduler process. All SGLang-version-specific attachment points are named here; the
hooks do nothing unless ``--kvcomm`` (or ``--radix-cache-backend kvcomm``) is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from importlib.metadata import version
from typing import TYPE_CHECKING

from sglang_kvcomm.config import (
    BACKEND_NAME,
    ENV_VAR,
    KVCommConfig,
    KVCommConfigError,
    add_cli_args,
    config_from_cli_args,
)
from sglang_kvcomm.protocol import from_custom_params

if TYPE_CHECKING:
    from sglang.srt.managers.io_struct import GetInternalStateReqOutput
    from sglang.srt.managers.schedule_policy import PrefillAdder
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

    from sglang_kvcomm.tree_cache import KVCommRadixCache

logger = logging.getLogger(__name__)

SUPPORTED_SGLANG = "0.5.17"

_ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
_FROM_CLI_ARGS = "sglang.srt.server_args.ServerArgs.from_cli_args"
_LAUNCH_HTTP_SERVER = "sglang.srt.entrypoints.http_server.launch_server"
_GET_INTERNAL_STATE = "sglang.srt.managers.scheduler.Scheduler.get_internal_state"
_VALIDATE_REQUEST = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
_OPEN_ROUND = "sglang.srt.managers.schedule_policy.PrefillAdder.__init__"
_CLOSE_ROUND = "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill"


def register() -> None:
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    installed = version("sglang")
    if installed != SUPPORTED_SGLANG:
        logger.warning(
            "sglang-kvcomm is built for sglang==%s, found %s", SUPPORTED_SGLANG, installed
        )
    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, _build_tree_cache)
    HookRegistry.register(_ADD_CLI_ARGS, _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(_FROM_CLI_ARGS, _before_from_cli_args, HookType.BEFORE)
    HookRegistry.register(_LAUNCH_HTTP_SERVER, _before_launch_http_server, HookType.BEFORE)
    HookRegistry.register(_GET_INTERNAL_STATE, _after_get_internal_state, HookType.AFTER)
    HookRegistry.register(_VALIDATE_REQUEST, _before_validate_request, HookType.BEFORE)
    HookRegistry.register(_OPEN_ROUND, _after_open_round, HookType.AFTER)
    HookRegistry.register(_CLOSE_ROUND, _after_close_round, HookType.AFTER)


def _after_add_cli_args(_result: None, parser: argparse.ArgumentParser) -> None:
    add_cli_args(parser)


def _before_from_cli_args(cls: type, args: argparse.Namespace) -> None:
    """Validate ``--kvcomm*`` before ServerArgs is built (its fields freeze after __post_init__)."""
    try:
        config = config_from_cli_args(args)
    except KVCommConfigError as exc:
        print(f"sglang: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if config is None:
        os.environ.pop(ENV_VAR, None)  # a stock server must not pick up a stale configuration
    else:
        os.environ[ENV_VAR] = config.to_json()  # spawned schedulers inherit it


def _before_launch_http_server(server_args: object, *args: object, **kwargs: object) -> None:
    if getattr(server_args, "radix_cache_backend", None) == BACKEND_NAME:
        from sglang.srt.entrypoints.http_server import app

        from sglang_kvcomm.http_routes import add_routes

        add_routes(app)


def _before_validate_request(
    manager: TokenizerManager, obj: object, input_ids: list[int] | None, *args: object
) -> None:
    """Refuse malformed kvcomm metadata before it reaches the scheduler: the ProtocolError (a
    ValueError) becomes a 400 with its message, and the server keeps serving."""
    if getattr(manager.server_args, "radix_cache_backend", None) != BACKEND_NAME:
        return
    sampling = getattr(obj, "sampling_params", None)
    if isinstance(sampling, Mapping):
        sent_ids = getattr(obj, "input_ids", None)
        from_custom_params(
            sampling.get("custom_params"), None if sent_ids is None else len(sent_ids)
        )


def _build_tree_cache(ctx: TreeCacheBuildContext) -> KVCommRadixCache:
    from radix_anchor.rope import UnsupportedRopeError
    from sglang_kvcomm.model_rope import rope_for_model
    from sglang_kvcomm.tree_cache import KVCommRadixCache

    unsupported = [
        name
        for name, on in (
            ("hybrid sliding-window attention", ctx.is_hybrid_swa),
            ("hybrid state-space layers", ctx.is_hybrid_ssm),
            ("--enable-hierarchical-cache", ctx.enable_hierarchical_cache),
            ("--disable-radix-cache", ctx.disable_radix_cache),
        )
        if on
    ]
    if unsupported:
        raise ValueError(f"the kvcomm cache backend does not support {', '.join(unsupported)}")
    model = ctx.tp_worker.model_runner.model
    rotary = next((m for m in model.modules() if hasattr(m, "cos_sin_cache")), None)
    if rotary is None:
        raise ValueError(f"--kvcomm: {type(model).__name__} has no rotary embedding to shift")
    try:
        rope = rope_for_model(ctx.model_config.hf_config, rotary)
    except UnsupportedRopeError as exc:
        raise ValueError(f"--kvcomm cannot serve {type(model).__name__}: {exc}") from exc
    metrics = None
    if getattr(ctx.server_args, "enable_metrics", False):
        from sglang_kvcomm.metrics import KVCommMetrics

        metrics = KVCommMetrics(ctx.server_args.served_model_name)
    return KVCommRadixCache(ctx.params, KVCommConfig.from_env(), rope, metrics)


def _after_get_internal_state(
    result: GetInternalStateReqOutput, scheduler: Scheduler, *args: object
) -> None:
    """Add the cache's report to the scheduler's internal state (read by /kvcomm/stats)."""
    report = getattr(scheduler.tree_cache, "kvcomm_report", None)
    if report is not None:
        result.internal_state["kvcomm"] = report()


def _after_open_round(_result: None, adder: PrefillAdder, *args: object, **kwargs: object) -> None:
    """An admission round starts: estimates planned in it come out of this adder's budget."""
    begin = getattr(adder.tree_cache, "begin_round", None)
    if begin is not None:
        begin(adder)


def _after_close_round(_result: object, scheduler: Scheduler, *args: object) -> None:
    """The round's prefill batch is formed (or none): free estimates nobody was admitted with."""
    end = getattr(scheduler.tree_cache, "end_round", None)
    if end is not None:
        end()

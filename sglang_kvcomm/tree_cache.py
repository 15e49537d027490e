"""The ``kvcomm`` radix-cache backend: SGLang's RadixCache plus KVCOMM's cross-context reuse.

- ``match_prefix``, on the call that admits a request (it carries the Req and a limit): the exact
  radix match, then ``KVComm.plan``. On reuse it allocates slots for the rest of the prompt but
  its last ``tail_tokens``, writes the estimated KV there and returns ``exact[:start] + slots``
  with ``cache_protected_len = start``: SGLang prefills only the tail and frees the estimated
  slots with the request. The request is marked ``skip_radix_cache_insert``, so approximate KV
  never enters the tree and no other request (exact, off, or without metadata) can match it.
- ``cache_unfinished_req`` / ``cache_finished_req``: after a dense prefill of an ``approx``
  request its spans become anchors; when a request finishes, its decode's KV becomes the base KV
  of its response.
- ``reset`` (``/flush_cache``) also forgets bases and anchors.

SGLang-side details and why they hold: ``docs/reuse-path.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache

import kvcomm_kernels
from radix_anchor.prompt import PromptLayout
from radix_anchor.reuse import Fallback, KVComm, ReuseConfig
from radix_anchor.rope import RopeSpec
from sglang_kvcomm.config import KVCommConfig
from sglang_kvcomm.kv_pool import PoolKV
from sglang_kvcomm.protocol import META_KEY, KVCommRequest, ProtocolError, from_custom_params
from sglang_kvcomm.stats import KVCommStats

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

logger = logging.getLogger(__name__)


@dataclass
class _RequestState:
    request: KVCommRequest
    slots: torch.Tensor | None = None  # estimated KV, held until the request ends
    start: int = 0  # the exact prefix returned with ``slots``
    counted: bool = False
    learned: bool = False


def _layout(req: Req, request: KVCommRequest) -> PromptLayout:
    return PromptLayout.of(req.origin_input_ids, [(s.start, s.end) for s in request.segments])


class KVCommRadixCache(RadixCache):
    def __init__(self, params: CacheInitParams, config: KVCommConfig, rope: RopeSpec) -> None:
        self.kvcomm: KVComm | None = None  # RadixCache.__init__ calls reset()
        super().__init__(params)
        if self.page_size != 1:
            raise ValueError(f"--kvcomm needs --page-size 1, got {self.page_size}")
        self.kvcomm_config = config
        self.kvcomm_rope = rope
        self.kvcomm = KVComm(
            rope,
            ReuseConfig(
                gamma=config.threshold,
                max_anchors=config.max_anchors,
                window=config.window,
                max_bytes=config.max_memory_mb << 20,
            ),
            distances=kvcomm_kernels.anchor_distances,
        )
        self.kv_pool = PoolKV(self.token_to_kv_pool_allocator.get_kvcache())
        on_cuda = torch.device(self.device).type == "cuda"
        self.tail_tokens = config.tail_tokens or (4 if on_cuda else 1)
        started = time.perf_counter()
        self.kv_pool.warm_up(rope)
        warm_up_s = time.perf_counter() - started
        self.kvcomm_stats = KVCommStats()
        self._pending: dict[str, Req] = {}  # requests holding estimated slots, not yet admitted
        logger.info(
            "KVCOMM tree cache: threshold(gamma)=%s max_anchors(V)=%s window(W)=%s "
            "max_memory=%dMiB tail_tokens=%d rope=%s/%d layers=%d kernels=%s (warm-up %.1fs)",
            config.threshold,
            config.max_anchors,
            config.window,
            config.max_memory_mb,
            self.tail_tokens,
            rope.layout,
            rope.head_dim,
            self.kv_pool.num_layers,
            kvcomm_kernels.backend_for(torch.device(self.device)),
            warm_up_s,
        )

    # -- prefix match: decide, inject -------------------------------------------------------

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        req = params.req
        if req is None or params.key.limit is None:
            return result  # scheduling-policy look-ups and re-matches: exact only
        state = self._state(req)
        if state is None:
            return result
        if state.slots is not None:
            return self._reuse_again(req, state, result)
        return self._decide(req, state, result, params.key.limit)

    def _decide(
        self, req: Req, state: _RequestState, exact: MatchResult, limit: int
    ) -> MatchResult:
        started = time.perf_counter()
        request = state.request
        exact_len = len(exact.device_indices)
        if request.mode == "off":
            self._record(req, state, "off", exact_len, Fallback("mode off"))
            return exact
        if request.mode == "exact":
            outcome: Fallback | object = Fallback("mode exact")
        elif req.output_ids:
            outcome = Fallback("retracted", "re-admitted with output tokens")
        else:
            layout = _layout(req, request)
            end = min(limit, len(layout.tokens) - self.tail_tokens)
            outcome = self.kvcomm.plan(layout, exact_len, end)
        if isinstance(outcome, Fallback):
            self._record(req, state, "dense", exact_len, outcome, started=started)
            return exact

        reuse = outcome
        slots = self._alloc(reuse.num_tokens, exact)
        if slots is None:
            self._record(req, state, "dense", exact_len, Fallback("KV pool full"), started=started)
            return exact
        self.kv_pool.write(reuse, slots, self.kvcomm_rope)
        self.kvcomm.commit(reuse)
        state.slots, state.start = slots, reuse.start
        req.skip_radix_cache_insert = True
        self._pending[req.rid] = req
        self._record(
            req, state, "reuse", reuse.start, None, estimated=reuse.num_tokens, started=started
        )
        return self._with_estimate(exact, state)

    def _reuse_again(self, req: Req, state: _RequestState, exact: MatchResult) -> MatchResult:
        """A later admission attempt of an injected request: same slots, fresh exact prefix."""
        if len(exact.device_indices) >= state.start:
            return self._with_estimate(exact, state)
        self._release(req, state)  # the exact prefix was evicted meanwhile
        self._record(req, state, "dense", len(exact.device_indices), Fallback("prefix evicted"))
        return exact

    def _with_estimate(self, exact: MatchResult, state: _RequestState) -> MatchResult:
        return exact._replace(
            device_indices=torch.cat([exact.device_indices[: state.start], state.slots]),
            cache_protected_len=state.start,
        )

    def _alloc(self, n: int, exact: MatchResult) -> torch.Tensor | None:
        allocator = self.token_to_kv_pool_allocator
        if allocator.available_size() < n:
            node = exact.last_device_node
            self.inc_lock_ref(node)  # keep the exact prefix while evicting for the estimate
            self.evict(EvictParams(num_tokens=n - allocator.available_size()))
            self.dec_lock_ref(node)
        return allocator.alloc(n)

    def _release(self, req: Req, state: _RequestState) -> None:
        """Free estimated slots that no admitted request owns yet."""
        if state.slots is not None:
            self.token_to_kv_pool_allocator.free(state.slots)
        state.slots = None
        req.skip_radix_cache_insert = False
        self._pending.pop(req.rid, None)

    def release_unadmitted(self, rids: list[str] | None = None) -> int:
        """Free the estimated slots of requests dropped before admission (aborted while
        queued). ``rids``: those requests; None: every request not admitted (the scheduler is
        idle). Returns how many were released."""
        released = 0
        for rid, req in list(self._pending.items()):
            if req.req_pool_idx is not None:
                self._pending.pop(rid)  # admitted: the request owns the slots now
            elif rids is None or rid in rids:
                self._release(req, req.kvcomm_state)
                released += 1
        return released

    # -- learning: anchors after dense prefill, base KV after decode -------------------------

    def cache_unfinished_req(self, req: Req, chunked: bool = False) -> None:
        # Learning waits for cache_finished_req: here it would sit between the prefill and the
        # first token's output (+6-10 ms of TTFT at 1K tokens, 8B, H100), and the prompt's KV
        # stays in the request's slots until it finishes.
        self._pending.pop(req.rid, None)
        super().cache_unfinished_req(req, chunked=chunked)

    def cache_finished_req(
        self, req: Req, is_insert: bool = True, *, kv_len_to_handle: int
    ) -> None:
        self._pending.pop(req.rid, None)
        state = self._state(req)
        if state is not None:
            self._learn_from_prefill(req, kv_len_to_handle)
            if req.finished() and not isinstance(req.finished_reason, FINISH_ABORT):
                self._learn_from_output(req, state, kv_len_to_handle)
            state.slots = None  # freed below with the request: they lie past cache_protected_len
            req.skip_radix_cache_insert = False  # a retracted request is matched afresh
        super().cache_finished_req(req, is_insert, kv_len_to_handle=kv_len_to_handle)

    def _learn_from_prefill(self, req: Req, kv_len: int) -> None:
        state = self._state(req)
        input_len = len(req.origin_input_ids)
        if (
            state is None
            or state.learned
            or state.slots is not None
            or state.request.mode != "approx"
            or not state.request.segments
            or kv_len < input_len
        ):
            return
        state.learned = True
        self.kvcomm.observe_prefill(
            _layout(req, state.request), lambda a, b: self.kv_pool.read(self._slots(req, a, b))
        )

    def _learn_from_output(self, req: Req, state: _RequestState, kv_len: int) -> None:
        input_len = len(req.origin_input_ids)
        if state.request.mode == "off" or kv_len <= input_len:
            return
        tokens = tuple(req.output_ids[: kv_len - input_len])
        kv = self.kv_pool.read(self._slots(req, input_len, kv_len))
        self.kvcomm.observe_output(tokens, kv, input_len)

    def _slots(self, req: Req, start: int, end: int) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token[req.req_pool_idx, start:end].to(torch.int64)

    # -- state, reports ---------------------------------------------------------------------

    def _state(self, req: Req) -> _RequestState | None:
        state = getattr(req, "kvcomm_state", None)
        if state is None:
            custom = getattr(req.sampling_params, "custom_params", None)
            try:
                request = from_custom_params(custom, len(req.origin_input_ids))
            except ProtocolError as exc:  # the tokenizer refuses these; never serve them
                logger.warning("kvcomm: request %s served without reuse: %s", req.rid, exc)
                request = KVCommRequest(mode="off")
            state = _RequestState(request) if request is not None else False
            req.kvcomm_state = state
        return state or None

    def _record(
        self,
        req: Req,
        state: _RequestState,
        decision: str,
        exact: int,
        fallback: Fallback | None,
        estimated: int = 0,
        started: float | None = None,
    ) -> None:
        prompt = len(req.origin_input_ids)
        report = {
            "decision": decision,
            "reason": fallback.reason if fallback else "",
            "detail": fallback.detail if fallback else "",
            "tokens_exact": exact,
            "tokens_estimated": estimated,
            "tokens_prefilled": prompt - exact - estimated,
            "agent": state.request.agent,
            # host time of the decision (plan, estimate, pool write as launched)
            "overhead_ms": 0.0 if started is None else 1000 * (time.perf_counter() - started),
        }
        req.customized_info = {**(req.customized_info or {}), META_KEY: [report]}
        if state.counted:
            return
        state.counted = True
        stats = self.kvcomm_stats
        stats.requests[decision] += 1
        if decision == "dense":
            stats.fallbacks[fallback.reason] += 1
        stats.tokens_matched_exact += exact
        stats.tokens_estimated += estimated
        stats.tokens_prefilled += prompt - exact - estimated

    def reset(self) -> None:
        super().reset()
        if self.kvcomm is not None:
            self.kvcomm.clear()

    def kvcomm_report(self) -> dict:
        return {
            "config": asdict(self.kvcomm_config),
            "rope": {"layout": self.kvcomm_rope.layout, "head_dim": self.kvcomm_rope.head_dim},
            **self.kvcomm_stats.as_dict(),
            **self.kvcomm.report(),
            "tail_tokens": self.tail_tokens,
            "pending_estimates": len(self._pending),
            "kv_pool": {  # token slots: available + evictable + protected + in use by requests
                "available": int(self.token_to_kv_pool_allocator.available_size()),
                "evictable": int(self.evictable_size()),
                "protected": int(self.protected_size()),
            },
        }

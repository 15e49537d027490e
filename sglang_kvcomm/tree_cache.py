"""The ``kvcomm`` radix-cache backend: SGLang's RadixCache plus KVCOMM's cross-context reuse.

- ``match_prefix``, on the call that admits a request (it carries the Req and a limit): the exact
  radix match, then ``KVComm.plan``. A reuse must fit the admission round's budget (the
  scheduler's ``PrefillAdder``, registered by ``begin_round``): its estimate plus what the request
  still needs, so the estimate never takes tokens the adder promised to requests admitted
  earlier in the round. It allocates slots for the rest of the prompt but its last
  ``tail_tokens``, writes the estimated KV there and returns ``exact[:start] + slots`` with
  ``cache_protected_len = start``: SGLang prefills only the tail and frees the estimated slots
  with the request.
- ``end_round``, after the scheduler formed its prefill batch: an estimate of a request that was
  not admitted is freed (a queued request holds nothing, however it later leaves the queue); an
  admitted one is owned by the request, and its anchors earn their activation.
- Approximate KV never enters the tree: ``cache_unfinished_req`` of a request served with an
  estimate only advances its prefix (chunked prefill) and ``cache_finished_req`` frees it.
- Learning: a dense prefill of an ``approx`` request teaches bases and anchors at the next
  admission round (``begin_round``) while the request runs, or when it finishes, whichever comes
  first; its decode's KV becomes the base KV of its response when it finishes. The request is
  counted then, at its final decision.
- Eviction keeps agent templates (the fixed prefix a reuse matches exactly) until no other leaf
  is left (``eviction.py``).
- ``reset`` (``/flush_cache``) also forgets bases, anchors and pending estimates.

SGLang-side details and why they hold: ``docs/reuse-path.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache

import kvcomm_kernels
from radix_anchor.estimate import EstimateOptions
from radix_anchor.prompt import PromptLayout
from radix_anchor.reuse import Fallback, KVComm, Reuse, ReuseConfig
from radix_anchor.rope import RopeSpec
from sglang_kvcomm.config import KVCommConfig
from sglang_kvcomm.eviction import TemplatesLast, node_at
from sglang_kvcomm.kv_pool import PoolKV
from sglang_kvcomm.metrics import KVCommMetrics
from sglang_kvcomm.protocol import META_KEY, KVCommRequest, ProtocolError, from_custom_params
from sglang_kvcomm.stats import KVCommStats

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.schedule_policy import PrefillAdder

logger = logging.getLogger(__name__)


@dataclass
class _RequestState:
    """Everything the extension holds for one request, on the request (``req.kvcomm_state``)."""

    request: KVCommRequest
    slots: torch.Tensor | None = None  # estimated KV, freed by end_round or with the request
    start: int = 0  # the exact prefix returned with ``slots``
    reuse: Reuse | None = None  # the plan behind ``slots``, until admitted
    admitted: bool = False  # ``slots`` belong to the running request
    report: dict | None = None  # the latest decision; counted when the request finishes
    counted: bool = False
    learned: bool = False


def _layout(req: Req, request: KVCommRequest) -> PromptLayout:
    return PromptLayout.of(req.origin_input_ids, [(s.start, s.end) for s in request.segments])


class KVCommRadixCache(RadixCache):
    def __init__(
        self,
        params: CacheInitParams,
        config: KVCommConfig,
        rope: RopeSpec,
        metrics: KVCommMetrics | None = None,
    ) -> None:
        self.kvcomm: KVComm | None = None  # RadixCache.__init__ calls reset()
        self._pending: dict[str, Req] = {}  # holding an estimate, not admitted yet
        self._learnable: dict[str, Req] = {}  # prefilled densely, running, not learned from
        self._templates: TemplatesLast | None = None
        super().__init__(params)
        self._templates = self.eviction_strategy = TemplatesLast(self.eviction_strategy)
        if self.page_size != 1:
            raise ValueError(f"--kvcomm needs --page-size 1, got {self.page_size}")
        self.kvcomm_config = config
        self.kvcomm_rope = rope
        self.kvcomm = KVComm(
            rope,
            ReuseConfig(
                threshold=config.threshold,
                max_anchors=config.max_anchors,
                window=config.window,
                max_bytes=config.max_memory_mb << 20,
                exact_final=config.exact_final,
                estimate=EstimateOptions(placeholder=config.placeholder),
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
        self.kvcomm_metrics = metrics
        self._round: PrefillAdder | None = None
        logger.info(
            "KVCOMM tree cache: threshold=%s max_anchors(V)=%s window(W)=%s "
            "max_memory=%dMiB tail_tokens=%d exact_final=%d placeholder=%s rope=%s/%d layers=%d "
            "kernels=%s (warm-up %.1fs)",
            config.threshold,
            config.max_anchors,
            config.window,
            config.max_memory_mb,
            self.tail_tokens,
            config.exact_final,
            config.placeholder,
            rope.layout,
            rope.head_dim,
            self.kv_pool.num_layers,
            kvcomm_kernels.backend_for(torch.device(self.device)),
            warm_up_s,
        )

    # -- admission rounds -------------------------------------------------------------------

    def begin_round(self, adder: PrefillAdder) -> None:
        """The scheduler opened an admission round: estimates come out of ``adder``'s budget.

        The round's requests may reuse what the running requests' dense prefills measured, so
        those are learned from now (a round opens only when requests wait), not at their
        finish: programs started together then reuse from the second round on."""
        self._round = adder
        for req in self._learnable.values():
            self._learn_from_prefill(req, req.kvcomm_state, len(req.origin_input_ids))
        self._learnable.clear()

    def end_round(self) -> None:
        """The round's batch is formed: admitted requests own their estimates, the others'
        are freed (they are planned afresh when admission is tried again)."""
        self._round = None
        released = 0
        for req in list(self._pending.values()):
            state = req.kvcomm_state
            if req.req_pool_idx is None:
                self._release(req, state)
                released += 1
                continue
            state.admitted = True
            self.kvcomm.commit(state.reuse)
            state.reuse = None
        self._pending.clear()
        if released:
            self.kvcomm_stats.estimates_released += released
            if self.kvcomm_metrics is not None:
                self.kvcomm_metrics.released.labels(**self.kvcomm_metrics.labels).inc(released)

    # -- prefix match: decide, inject -------------------------------------------------------

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        req = params.req
        if req is None or params.key.limit is None:
            return result  # scheduling-policy look-ups and re-matches: exact only
        state = self._state(req)
        if state is None:
            return result
        if state.admitted:
            return self._with_estimate(result, state)  # a re-match of a running request
        self._release(req, state)  # an earlier attempt's estimate: plan afresh
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
            outcome: Fallback | Reuse = Fallback("mode exact")
        elif req.output_ids:
            outcome = Fallback("retracted", "re-admitted with output tokens")
        else:
            layout = _layout(req, request)
            self._keep_template(exact, exact_len, layout)
            end = min(limit, len(layout.tokens) - self.tail_tokens)
            outcome = self.kvcomm.plan(layout, exact_len, end)
        planned = time.perf_counter()
        if not isinstance(outcome, Fallback):
            outcome = self._inject(req, state, outcome, exact)
        if isinstance(outcome, Fallback):
            self._record(req, state, "dense", exact_len, outcome, started=(started, planned))
            return exact
        self._record(
            req,
            state,
            "reuse",
            outcome.start,
            None,
            estimated=outcome.num_tokens,
            started=(started, planned),
            gate=outcome.gate_statistic,
        )
        return self._with_estimate(exact, state)

    def _keep_template(self, exact: MatchResult, exact_len: int, layout: PromptLayout) -> None:
        """The agent's fixed prefix, if matched, is evicted after other leaves (eviction.py)."""
        if layout.spans:
            node = node_at(exact.last_device_node, exact_len, layout.spans[0][0] - 1)
            if node is not None:
                self._templates.mark(node)

    def _inject(
        self, req: Req, state: _RequestState, reuse: Reuse, exact: MatchResult
    ) -> Reuse | Fallback:
        """Allocate and write the estimate within the round's budget, or say why not."""
        short = self._budget_shortfall(req, reuse)
        if short is not None:
            return Fallback("KV pool full", short)
        slots = self._alloc(reuse.num_tokens, exact)
        if slots is None:
            return Fallback("KV pool full", f"no {reuse.num_tokens} free slots")
        self.kv_pool.write(reuse, slots, self.kvcomm_rope)
        state.slots, state.start, state.reuse = slots, reuse.start, reuse
        self._pending[req.rid] = req
        return reuse

    def _budget_shortfall(self, req: Req, reuse: Reuse) -> str | None:
        """Why the round cannot take the estimate plus the rest of the request, or None.

        ``PrefillAdder.add_one_req`` admits a request when its extend plus its clipped
        ``max_new_tokens`` plus a page stay below ``rem_total_tokens`` (free + evictable minus
        what the round promised so far); the estimate's slots come out of the same tokens."""
        adder = self._round
        if adder is None:
            return "no admission round"
        max_new = min(
            max(req.sampling_params.max_new_tokens - len(req.output_ids), 0), CLIP_MAX_NEW_TOKENS
        )
        prefill = len(req.full_untruncated_fill_ids) - reuse.end
        needed = reuse.num_tokens + prefill + max_new + self.page_size
        budget = adder.rem_total_tokens
        if needed >= budget:
            return f"needs {needed} tokens, the round has {int(budget)}"
        return None

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
        """Free an estimate no admitted request owns."""
        if state.slots is not None and not state.admitted:
            self.token_to_kv_pool_allocator.free(state.slots)
            state.slots, state.reuse = None, None
        self._pending.pop(req.rid, None)

    # -- after prefill and at the end: approximate KV stays out of the tree ----------------

    def cache_unfinished_req(self, req: Req, chunked: bool = False) -> None:
        state = self._state(req)
        if state is None or not state.admitted:
            super().cache_unfinished_req(req, chunked=chunked)
            if state is not None and not state.learned and not chunked:
                if len(req.get_fill_ids()) >= len(req.origin_input_ids):
                    self._learnable[req.rid] = req
            return
        # Served with an estimate: nothing of it may enter the tree. The next chunk starts after
        # what is computed so far; everything past ``cache_protected_len`` is freed at the end.
        filled = len(req.get_fill_ids())
        req.prefix_indices = self.req_to_token_pool.req_to_token[req.req_pool_idx, :filled].to(
            torch.int64, copy=True
        )

    def cache_finished_req(
        self, req: Req, is_insert: bool = True, *, kv_len_to_handle: int
    ) -> None:
        # Learning from a prefill waits for the next admission round or for here: in
        # cache_unfinished_req it would sit between the prefill and the first token's output
        # (+6-10 ms of TTFT at 1K tokens, 8B, H100).
        state = self._state(req)
        self._learnable.pop(req.rid, None)
        if state is not None:
            if not state.admitted:
                self._learn_from_prefill(req, state, kv_len_to_handle)
            if req.finished() and not isinstance(req.finished_reason, FINISH_ABORT):
                self._learn_from_output(req, state, kv_len_to_handle)
            if req.finished():
                self._count(state)
            is_insert = is_insert and not state.admitted
            # the estimate lies past cache_protected_len: freed below with the request
            state.slots, state.admitted = None, False
        super().cache_finished_req(req, is_insert, kv_len_to_handle=kv_len_to_handle)
        if state is not None and self.kvcomm_metrics is not None:
            self.kvcomm_metrics.held(self.kvcomm.report(), len(self._pending))

    def _learn_from_prefill(self, req: Req, state: _RequestState, kv_len: int) -> None:
        input_len = len(req.origin_input_ids)
        if (
            state.learned
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
        self.kvcomm.observe_output(tokens, kv, input_len, _layout(req, state.request))

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
        started: tuple[float, float] | None = None,
        gate: float | None = None,
    ) -> None:
        now = time.perf_counter()
        began, planned = started or (now, now)
        state.report = {
            "decision": decision,
            "reason": fallback.reason if fallback else "",
            "detail": fallback.detail if fallback else "",
            "tokens_exact": exact,
            "tokens_estimated": estimated,
            "tokens_prefilled": len(req.origin_input_ids) - exact - estimated,
            "agent": state.request.agent,
            "gate_statistic": gate,  # of a reuse; a fallback's detail names it
            # host time of the decision (plan, estimate, pool write as launched), and of the plan
            "overhead_ms": 1000 * (now - began),
            "plan_ms": 1000 * (planned - began),
        }
        req.customized_info = {**(req.customized_info or {}), META_KEY: [state.report]}

    def _count(self, state: _RequestState) -> None:
        """Count a finished request once, at its final decision."""
        if state.counted or state.report is None:
            return
        state.counted = True
        self.kvcomm_stats.count(state.report)
        if self.kvcomm_metrics is not None:
            self.kvcomm_metrics.count(state.report)

    def reset(self) -> None:
        for req in list(self._pending.values()):
            self._release(req, req.kvcomm_state)
        self._round = None
        self._learnable.clear()
        if self._templates is not None:
            self._templates.clear()
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

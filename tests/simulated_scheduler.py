"""A scheduler in miniature around a real ``KVCommRadixCache``, for lifecycle tests without a model.

The pieces are SGLang's own: ``ReqToTokenPool``, ``MHATokenToKVPool`` and
``TokenToKVPoolAllocator`` on CPU, ``Req``, ``PrefillAdder``, ``alloc_for_extend`` (which raises
``Out of memory`` when admission over-committed), ``alloc_token_slots``,
``maybe_cache_unfinished_req`` and ``release_kv_cache``. What the scheduler does around them is
copied in the order of ``Scheduler._get_new_batch_prefill_raw`` (sglang 0.5.17): open a round
(the plugin's hook), match + ``add_one_req`` per waiting request, form the batch and allocate,
close the round (the plugin's hook). The "model" writes a deterministic KV per (token, position)
into the pool and samples token ids from a counter.
"""

from __future__ import annotations

import itertools
from array import array
from types import SimpleNamespace

import torch
from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH, Req
from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder
from sglang.srt.mem_cache.allocation import alloc_for_extend, alloc_token_slots
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import maybe_cache_unfinished_req, release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.sampling.sampling_params import SamplingParams

from radix_anchor.rope import RopeSpec
from sglang_kvcomm.config import KVCommConfig
from sglang_kvcomm.tree_cache import KVCommRadixCache

LAYERS, HEADS, HEAD_DIM = 2, 2, 8


def _publish_server_args() -> None:
    """SGLang's admission code reads process-wide config (``runtime_context``): publish a
    default server configuration, as a scheduler process does at start (ServerArgs reads a
    model's config, hence the packaged SmolLM2)."""
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    from sglang_kvcomm.assets.models import model_dir

    publish(ServerArgs(model_path=str(model_dir("smollm2")), device="cpu"), role="test")


class SimulatedScheduler:
    def __init__(
        self,
        total_tokens: int = 256,
        max_requests: int = 16,
        chunk: int | None = None,
        config: KVCommConfig | None = None,
        max_prefill_tokens: int = 1 << 20,
    ) -> None:
        _publish_server_args()
        self.req_to_token_pool = ReqToTokenPool(max_requests, 512, "cpu", False)
        kv = MHATokenToKVPool(total_tokens, 1, torch.float32, HEADS, HEAD_DIM, LAYERS, "cpu", False)
        self.allocator = TokenToKVPoolAllocator(total_tokens, torch.float32, "cpu", kv, False)
        self.kv = kv
        params = CacheInitParams(
            disable=False,
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool_allocator=self.allocator,
            page_size=1,
        )
        self.cache = KVCommRadixCache(
            params,
            config or KVCommConfig(threshold=1.0, max_anchors=4, window=2),
            RopeSpec.from_theta(HEAD_DIM, 10_000.0),
        )
        self.total_tokens = total_tokens
        self.chunk = chunk
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None
        self._rids = itertools.count()
        self._sampled = itertools.count(50_000)

    # -- requests ---------------------------------------------------------------------------

    def request(
        self, tokens: list[int], spans: list[int] | None = None, *, max_new: int = 2, **custom
    ) -> Req:
        custom_params = None
        if spans is not None or custom:
            custom_params = {"kvcomm_spans": list(spans or []), **custom}
        sampling = SamplingParams(max_new_tokens=max_new, custom_params=custom_params)
        sampling.normalize(None)
        req = Req(f"r{next(self._rids)}", "", array("q", tokens), sampling)
        self.waiting.append(req)
        return req

    def report(self, req: Req) -> dict:
        return req.customized_info["kvcomm"][0]

    # -- one scheduling step ----------------------------------------------------------------

    def step(self) -> list[Req]:
        """A prefill round if anything waits, else a decode step; returns the requests that
        prefilled this step."""
        batch = self.prefill_round()
        if batch:
            self._forward_extend(batch)
        elif self.running:
            self._decode()
        return batch

    def prefill_round(self) -> list[Req]:
        if self.chunked is not None:
            self.chunked.inflight_middle_chunks = 0
            maybe_cache_unfinished_req(self.chunked, self.cache, chunked=True)  # the stash
        running = SimpleNamespace(reqs=self.running, batch_size=lambda: len(self.running))
        adder = PrefillAdder(
            1, self.cache, self.allocator, running, 1.0, self.max_prefill_tokens, self.chunk
        )
        self._hook("begin_round", adder)  # the plugin's hook on PrefillAdder.__init__
        try:
            if self.chunked is not None:
                self.chunked.init_next_round_input()
                self.chunked = adder.add_chunked_req(self.chunked)
            for req in self.waiting:
                req.init_next_round_input(self.cache)
                if adder.add_one_req(req, False, None) != AddReqResult.CONTINUE:
                    break
            batch = adder.can_run_list
            if batch:
                self.waiting = [r for r in self.waiting if r not in batch]
                if adder.new_chunked_req is not None:
                    self.chunked = adder.new_chunked_req
                self._allocate_extend(batch)
        finally:
            self._hook("end_round")  # the plugin's hook after get_new_batch_prefill
        return batch

    def _hook(self, name: str, *args: object) -> None:
        hook = getattr(self.cache, name, None)  # absent before the admission-round fix
        if hook is not None:
            hook(*args)

    def _allocate_extend(self, batch: list[Req]) -> None:
        seq_lens = [r.extend_range.end for r in batch]
        ns = SimpleNamespace(
            reqs=batch,
            prefix_lens=[len(r.prefix_indices) for r in batch],
            extend_lens=[r.extend_range.length for r in batch],
            extend_num_tokens=sum(r.extend_range.length for r in batch),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64),
            seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int64),
            device="cpu",
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool_allocator=self.allocator,
            tree_cache=self.cache,
            maybe_evict_swa=lambda: None,
            is_dllm=lambda: False,
        )
        alloc_for_extend(ns)  # raises RuntimeError("Out of memory ...") on over-commit
        for req, seq_len in zip(batch, seq_lens, strict=True):
            req.kv_committed_len = seq_len

    def _forward_extend(self, batch: list[Req]) -> None:
        for req in batch:
            start, end = len(req.prefix_indices), req.extend_range.end
            self._write_kv(req, start, end)
            if req is self.chunked:
                continue  # a middle chunk: stashed at the next round
            req.output_ids.append(next(self._sampled))
            self._maybe_finish(req)
            if not req.finished():
                maybe_cache_unfinished_req(req, self.cache)
                self.running.append(req)

    def _decode(self) -> None:
        slots = alloc_token_slots(self.cache, len(self.running))
        for req, slot in zip(list(self.running), slots, strict=True):
            pos = req.kv_committed_len
            self.req_to_token_pool.req_to_token[req.req_pool_idx, pos] = slot
            req.kv_committed_len += 1
            req.kv.kv_allocated_len = req.kv_committed_len
            self._write_kv(req, pos, pos + 1)
            req.output_ids.append(next(self._sampled))
            self._maybe_finish(req)

    def _maybe_finish(self, req: Req) -> None:
        if len(req.output_ids) >= req.sampling_params.max_new_tokens:
            req.finished_reason = FINISH_LENGTH(len(req.output_ids))
            self._release(req)

    def _release(self, req: Req, is_insert: bool = True) -> None:
        release_kv_cache(req, self.cache, is_insert=is_insert)
        if req in self.running:
            self.running.remove(req)

    def _write_kv(self, req: Req, start: int, end: int) -> None:
        ids = (req.origin_input_ids + req.output_ids)[start:end]
        slots = self.req_to_token_pool.req_to_token[req.req_pool_idx, start:end].long()
        for layer in range(LAYERS):
            for i, (token, slot) in enumerate(zip(ids, slots.tolist(), strict=True)):
                g = torch.Generator().manual_seed(token * 7919 + (start + i) * 31 + layer)
                self.kv.k_buffer[layer][slot] = torch.randn(HEADS, HEAD_DIM, generator=g)
                self.kv.v_buffer[layer][slot] = torch.randn(HEADS, HEAD_DIM, generator=g)

    # -- lifecycle events -------------------------------------------------------------------

    def run(self, max_steps: int = 200) -> None:
        """Step until nothing waits or runs."""
        for _ in range(max_steps):
            if not (self.waiting or self.running or self.chunked):
                return
            self.step()
        raise AssertionError(f"not done after {max_steps} steps")

    def drop_queued(self, req: Req) -> None:
        """What abort, a queue timeout or a priority drop does to a waiting request: the
        scheduler pops it; the cache is not told."""
        self.waiting.remove(req)

    def abort_running(self, req: Req) -> None:
        req.finished_reason = FINISH_ABORT("aborted")
        self._release(req, is_insert=False)

    def retract(self, req: Req) -> None:
        """``release_req`` of a retracted decode: free, reset, back to the queue."""
        self._release(req, is_insert=False)
        req.reset_for_retract()
        self.waiting.insert(0, req)

    def flush(self) -> None:
        """``Scheduler.flush_cache`` (only when idle): reset the tree cache, clear the pools."""
        assert not (self.waiting or self.running or self.chunked)
        self.cache.reset()
        self.req_to_token_pool.clear()
        self.allocator.clear()

    def exact_match_len(self, tokens: list[int]) -> int:
        """How much of ``tokens`` the radix tree holds (a look-up without a request)."""
        key = RadixKey(array("q", tokens))
        return len(self.cache.match_prefix(MatchPrefixParams(key=key)).device_indices)

    def leaked(self) -> int:
        """Slots neither free, in the tree, nor held by a live request (SGLang's idle check)."""
        live = self.running + ([self.chunked] if self.chunked is not None else [])
        held = sum(r.kv_committed_len - r.cache_protected_len for r in live)
        accounted = (
            self.allocator.available_size()
            + self.cache.evictable_size()
            + self.cache.protected_size()
        )
        return self.total_tokens - accounted - held

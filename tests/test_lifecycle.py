"""Every request path through ``KVCommRadixCache`` frees what it holds and takes memory only
through SGLang's admission: a real cache over SGLang's CPU pools and allocator, driven by a
miniature scheduler (``simulated_scheduler.py``). After each path the allocator's available +
evictable + protected slots plus what live requests hold equals the pool (``leaked() == 0``),
the check SGLang's scheduler runs when idle."""

from __future__ import annotations

import pytest
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from simulated_scheduler import SimulatedScheduler

from sglang_kvcomm.config import KVCommConfig

P, P2 = list(range(100, 110)), list(range(200, 210))  # two agents' fixed prefixes
S = list(range(300, 304))  # the fixed text after the shared span


def question(k: int) -> list[int]:
    return list(range(1000 + 20 * k, 1008 + 20 * k))


def prompt(prefix: list[int], shared: list[int]) -> tuple[list[int], list[int]]:
    return prefix + shared + S, [len(prefix), len(prefix) + len(shared)]


TAUGHT = ((P2, 1), (P2, 2), (P, 1), (P, 2), (P2, 3))


def taught(**kwargs) -> SimulatedScheduler:
    """Agent P2 reads questions 1 and 2 first (their bases), agent P after it (two anchors for
    P's placeholder against P2's bases), and P2 reads question 3 (its base): agent P reading
    question 3 is then a reuse of 8 estimated tokens behind a 10-token exact prefix, its
    final 4-token segment prefilled."""
    sim = SimulatedScheduler(**kwargs)
    for prefix, k in TAUGHT:
        sim.request(*prompt(prefix, question(k)))
        sim.run()
    assert sim.leaked() == 0
    return sim


def reuse_request(sim: SimulatedScheduler, **kwargs):
    return sim.request(*prompt(P, question(3)), **kwargs)


def counted(sim: SimulatedScheduler) -> dict:
    return sim.cache.kvcomm_report()["requests"]


def test_a_reuse_is_served_and_frees_its_estimate():
    sim = taught()
    req = reuse_request(sim)
    sim.run()
    assert sim.report(req)["decision"] == "reuse"
    assert sim.report(req)["tokens_estimated"] == 8
    assert counted(sim) == {"reuse": 1, "dense": 5, "off": 0}
    assert sim.leaked() == 0


def test_an_estimate_never_takes_tokens_promised_earlier_in_the_round():
    """A long plain request is admitted first and promised nearly the whole pool; the reuse
    behind it must not allocate its estimate out of that promise (before: the earlier request's
    allocation raised ``Out of memory`` and would end the scheduler)."""
    sim = taught()
    plain = sim.request(list(range(5000, 5000 + 251)))  # 251 + 2 new + 1 page of 256 slots
    req = reuse_request(sim)
    sim.step()  # the round that admits `plain`: must not raise
    assert plain.req_pool_idx is not None
    assert req.req_pool_idx is None  # waits: the pool is promised to `plain`
    assert sim.report(req)["reason"] == "KV pool full"
    sim.run()  # `plain` took the tree's slots too: the request is served densely
    assert req.finished() and sim.report(req)["reason"] == "prefix not cached"
    assert sim.leaked() == 0


def test_two_reuses_in_one_round_share_its_budget():
    """A plain request between two reuses takes what the first leaves: the second waits
    instead of over-committing the round."""
    sim = taught(total_tokens=140)
    first = reuse_request(sim)
    sim.request(list(range(6000, 6110)))
    second = reuse_request(sim)
    sim.step()
    assert first.req_pool_idx is not None and sim.report(first)["decision"] == "reuse"
    assert second.req_pool_idx is None
    assert sim.report(second)["reason"] == "KV pool full"
    sim.run()
    assert second.finished()
    assert sim.leaked() == 0


def test_a_running_dense_prefill_teaches_the_next_round():
    """Programs started together: the second request of a pool waits while the first runs; the
    first's prefill is learned from when the next round opens, not when it finishes, so the
    waiting request reuses (before: warm-up, one anchor)."""
    sim = SimulatedScheduler(max_prefill_tokens=20)
    for prefix, k in ((P2, 1), (P2, 2), (P, 1), (P2, 3)):
        sim.request(*prompt(prefix, question(k)))
        sim.run()
    first = sim.request(*prompt(P, question(2)), max_new=8)  # extends 12 of 20 tokens
    second = reuse_request(sim)
    sim.step()
    assert first.req_pool_idx is not None and second.req_pool_idx is None
    assert sim.report(first)["reason"] == "warm-up"
    sim.step()  # the next round: `first` decodes, `second` is admitted
    assert not first.finished()
    assert sim.report(second)["decision"] == "reuse"
    sim.run()
    assert counted(sim) == {"reuse": 1, "dense": 5, "off": 0}
    assert sim.leaked() == 0


def test_a_queued_request_dropped_holds_nothing():
    """Abort of a waiting request, the waiting-queue timeout and a priority drop all pop the
    request from the queue without telling the cache: an estimate made for a request the round
    did not admit is freed when the round ends."""
    sim = taught(max_prefill_tokens=64)
    sim.request(list(range(7000, 7063)))  # leaves 1 token of the round's prefill budget
    req = reuse_request(sim)
    sim.step()
    assert req.req_pool_idx is None and sim.report(req)["decision"] == "reuse"
    sim.drop_queued(req)
    assert sim.leaked() == 0  # while the other request still runs
    sim.run()
    assert sim.leaked() == 0
    report = sim.cache.kvcomm_report()
    assert (report["estimates_released"], report["pending_estimates"]) == (1, 0)


def test_anchors_earn_activations_only_when_admitted():
    sim = taught(max_prefill_tokens=64)

    def activations() -> int:
        return sum(a.activations for pool in sim.cache.kvcomm.anchors.pools() for a in pool)

    sim.request(list(range(7000, 7063)))
    req = reuse_request(sim)
    sim.step()  # planned, not admitted
    assert activations() == 0
    sim.run()
    assert sim.report(req)["decision"] == "reuse"
    assert activations() > 0


def test_prefix_evicted_while_queued_is_served_and_counted_dense():
    sim = taught(max_prefill_tokens=64)
    sim.request(list(range(7000, 7063)))
    req = reuse_request(sim)
    sim.step()  # planned as a reuse, not admitted
    assert sim.report(req)["decision"] == "reuse"
    sim.cache.evict(EvictParams(num_tokens=10_000))  # memory pressure empties the tree
    sim.run()
    assert sim.report(req) | {"overhead_ms": 0, "plan_ms": 0} == sim.report(req) | {
        "decision": "dense",
        "reason": "prefix not cached",
        "overhead_ms": 0,
        "plan_ms": 0,
    }
    assert counted(sim) == {"reuse": 0, "dense": 5 + 1, "off": 0}  # the plain one has no metadata
    assert sim.leaked() == 0


def test_a_retracted_reuse_is_prefilled_again_and_counted_dense():
    sim = taught()
    req = reuse_request(sim, max_new=4)
    sim.step()  # prefill with the estimate, then it decodes
    assert sim.report(req)["decision"] == "reuse"
    sim.step()
    sim.retract(req)
    assert sim.leaked() == 0
    sim.run()
    assert sim.report(req)["reason"] == "retracted"
    assert counted(sim) == {"reuse": 0, "dense": 6, "off": 0}
    assert sim.leaked() == 0


def test_a_running_reuse_aborted_frees_its_estimate():
    sim = taught()
    req = reuse_request(sim, max_new=4)
    sim.step()
    sim.abort_running(req)
    assert sim.leaked() == 0
    assert counted(sim)["reuse"] == 1  # it was served with the estimate until aborted


def test_an_estimate_that_does_not_fit_the_pool_falls_back():
    sim = taught(total_tokens=100)
    sim.request(list(range(8000, 8020)), max_new=70)  # its decode is promised the pool
    sim.step()
    req = reuse_request(sim)
    sim.step()
    assert sim.report(req)["reason"] == "KV pool full"
    sim.run()
    assert sim.leaked() == 0


@pytest.mark.parametrize("chunk", [2, 3])
def test_a_chunked_tail_keeps_its_first_chunk(chunk):
    """The tail left to prefill (4 tokens here) is split across rounds: each chunk's slots stay
    the request's and nothing approximate enters the tree (before: the chunk's slots were
    dropped and re-allocated, leaking)."""
    config = KVCommConfig(threshold=1.0, max_anchors=4, window=2, tail_tokens=4)
    sim = taught(chunk=chunk, config=config)
    req = reuse_request(sim)
    sim.run()
    assert sim.report(req)["decision"] == "reuse"
    assert sim.report(req)["tokens_prefilled"] == 4
    assert sim.leaked() == 0
    # the tree holds no KV of the reused prompt past its exact prefix
    tokens, _ = prompt(P, question(3))
    assert sim.exact_match_len(tokens) == len(P)


def test_flush_forgets_everything():
    """``/flush_cache`` after a request was planned, not admitted and dropped: bases, anchors and
    per-request state are gone, and the pool serves on without a leak or a double free."""
    sim = taught(max_prefill_tokens=64)
    sim.request(list(range(7000, 7063)))
    dropped = reuse_request(sim)
    sim.step()
    sim.drop_queued(dropped)
    sim.run()
    sim.flush()
    report = sim.cache.kvcomm_report()
    assert (report["bases"], report["anchors"], report["pending_estimates"]) == (0, 0, 0)
    assert sim.leaked() == 0
    again = reuse_request(sim)
    sim.run()
    assert sim.report(again)["reason"] == "prefix not cached"
    assert sim.leaked() == 0
    free = sim.allocator.free_pages.tolist()
    assert len(free) == len(set(free)) == sim.allocator.available_size()


def test_an_exact_hit_on_a_taught_prompt_adds_no_duplicate_anchor():
    """A prompt prefilled again (a retry, an exact prefix hit over its spans) is the same sample:
    a second copy would split the gate's weight and keep it closed for similar content."""
    sim = taught()
    anchors = sim.cache.kvcomm_report()["anchors"]
    sim.request(*prompt(P, question(1)))
    sim.run()
    assert sim.cache.kvcomm_report()["anchors"] == anchors


def test_agent_templates_are_evicted_after_older_prompts():
    """Memory pressure takes the prompts behind an agent's fixed prefix before the prefix: the
    next request of the agent still matches it exactly and reuses (before: LRU took agent P's
    prefix, older than P2's last prompt, and the request was prefilled densely, "prefix not
    cached")."""
    sim = taught()
    behind = sim.cache.evictable_size() - 2 * len(P)  # everything but the two agents' prefixes
    sim.cache.evict(EvictParams(num_tokens=behind))
    assert sim.cache.evictable_size() == 2 * len(P)
    req = reuse_request(sim)
    sim.run()
    assert sim.report(req)["tokens_exact"] == len(P)
    assert sim.report(req)["decision"] == "reuse"
    assert sim.leaked() == 0

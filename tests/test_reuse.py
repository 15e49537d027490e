"""The serving loop of ``radix_anchor.reuse``: what it plans, what it learns, what it holds.

Synthetic KV for the decisions and bookkeeping; the real SmolLM2 (transformers, fp32) for the
numbers: a planned reuse must equal the estimate computed span by span, keep layer 0 exact and
be closer to dense prefill than unrotated reuse."""

from __future__ import annotations

import torch

from radix_anchor.anchor_pool import KV
from radix_anchor.base_store import BaseStore
from radix_anchor.estimate import estimate, held_out_error
from radix_anchor.prompt import PromptLayout
from radix_anchor.reuse import Fallback, KVComm, Reuse, ReuseConfig
from radix_anchor.rope import RopeSpec, rotate

L, H, D = 3, 2, 8
ROPE = RopeSpec.from_theta(D, 1e4)
PREFIX, FOLLOW, TAIL = (1, 2, 3), (7, 8), (9, 10, 11)
SIBLING = (4, 5, 6)  # another agent's prefix
PAPER = ReuseConfig(threshold=1.0, exact_final=0)  # every token after the exact prefix estimated


def _kv(tokens: int, seed: int) -> KV:
    g = torch.Generator().manual_seed(seed)
    return KV(torch.randn(L, tokens, H, D, generator=g), torch.randn(L, tokens, H, D, generator=g))


def _layout(
    first: tuple[int, ...], second: tuple[int, ...], prefix=PREFIX, follow=FOLLOW, tail=TAIL
) -> PromptLayout:
    tokens = (*prefix, *first, *follow, *second, *tail)
    a = len(prefix)
    b = a + len(first) + len(follow)
    return PromptLayout.of(tokens, [(a, a + len(first)), (b, b + len(second))])


def _observe(engine: KVComm, layout: PromptLayout, seed: int) -> KV:
    measured = _kv(len(layout.tokens), seed)
    engine.observe_prefill(layout, lambda a, b: measured.tokens(slice(a, b)))
    return measured


def _teach(engine: KVComm, first: tuple[int, ...], second: tuple[int, ...], seed: int) -> None:
    """A sibling agent's prefill gives the contents their bases; PREFIX's, one anchor a span."""
    _observe(engine, _layout(first, second, prefix=SIBLING), seed)
    _observe(engine, _layout(first, second), seed + 1000)


def _contents(n: int, length: int = 4) -> list[tuple[int, ...]]:
    return [tuple(range(100 + 10 * i, 100 + 10 * i + length)) for i in range(n)]


def test_the_prefill_that_gives_a_base_teaches_no_anchor_the_next_one_does():
    engine = KVComm(ROPE)
    first, second = _contents(2)
    sibling = _layout(first, second, prefix=SIBLING)
    measured = _observe(engine, sibling, seed=0)
    (s0, e0), _ = sibling.spans
    base = engine.bases.get(first)
    torch.testing.assert_close(base.k, rotate(measured.k[:, s0:e0], -s0, ROPE))
    torch.testing.assert_close(base.v, measured.v[:, s0:e0])
    assert engine.bases.get(second) is not None
    assert engine.report()["anchors"] == 0  # offsets against itself: zero, nothing learned

    layout = _layout(first, second)
    measured = _observe(engine, layout, seed=1)
    for j, (start, end) in enumerate(layout.spans):
        key = engine.pool_key(layout, j)
        assert key == (layout.slot_key(j), sibling.slot_key(j))  # template, base's origin
        (anchor,) = engine.anchors.get(key)
        assert anchor.following_ids == layout.following(j)
        assert anchor.content_ids == layout.content(j)
        want_v = measured.v[:, start:end] - engine.bases.get(layout.content(j)).v
        torch.testing.assert_close(anchor.ph_offset.v, want_v)
    assert engine.report()["anchors"] == 2 and engine.report()["bases"] == 2


def test_a_pool_never_mixes_bases_of_two_origins():
    engine = KVComm(ROPE, PAPER)
    contents = _contents(4)
    _teach(engine, contents[0], contents[1], seed=0)
    _teach(engine, contents[2], contents[3], seed=1)
    # the same template, but contents whose bases a decode made: another pool, still empty
    fresh = _contents(6)[4:]
    for content in fresh:
        engine.observe_output(content, _kv(len(content), seed=5), position=3)
    layout = _layout(*fresh)
    assert engine.pool_key(layout, 0)[1] != engine.pool_key(_layout(*contents[:2]), 0)[1]
    assert engine.plan(layout, len(PREFIX), len(layout.tokens) - 1).reason == "warm-up"


def test_plan_falls_back_with_a_reason():
    engine = KVComm(ROPE, PAPER)
    contents = _contents(6)
    layout = _layout(contents[0], contents[1])
    start = layout.spans[0][0]
    end = len(layout.tokens) - 1
    assert engine.plan(PromptLayout.of(layout.tokens, []), 0, end).reason == "no shared spans"
    assert engine.plan(layout, start - 1, end).reason == "prefix not cached"
    assert engine.plan(layout, layout.spans[1][1], end).reason == (
        "exact prefix covers the shared spans"
    )
    assert engine.plan(layout, start, end).reason == "no base KV"
    _teach(engine, contents[0], contents[1], seed=1)
    assert engine.plan(layout, start, end).reason == "warm-up"  # one anchor per pool
    _teach(engine, contents[2], contents[3], seed=2)
    other_following = PromptLayout.of(
        (*layout.tokens[:-1], 99), layout.spans
    )  # same contents, the segment after the last span differs
    assert engine.plan(other_following, start, end).reason == "following segment unseen"
    assert isinstance(engine.plan(layout, start, end), Reuse)


def test_the_final_segment_is_prefilled_up_to_its_cap():
    engine = KVComm(ROPE, ReuseConfig(threshold=1.0, exact_final=5))
    contents = _contents(6)
    for tail in (TAIL, tuple(range(200, 208))):
        for i in range(2):
            _observe(engine, _layout(*contents[2 * i : 2 * i + 2], prefix=SIBLING, tail=tail), i)
            _observe(engine, _layout(*contents[2 * i : 2 * i + 2], tail=tail), 10 + i)
    short = _layout(contents[0], contents[3])  # a final segment of 3 tokens: all prefilled
    plan = engine.plan(short, len(PREFIX), len(short.tokens) - 1)
    assert plan.end == short.spans[1][1]
    assert plan.pieces[-1].following_tokens == 0
    # a final segment of 8: its first 3 estimated (their following offsets), the last 5 exact
    long = _layout(contents[0], contents[3], tail=tuple(range(200, 208)))
    plan = engine.plan(long, len(PREFIX), len(long.tokens) - 1)
    assert plan.end == len(long.tokens) - 5 and plan.pieces[-1].following_tokens == 3
    # a final segment never seen is no reason to fall back when none of it is estimated
    unseen = _layout(contents[0], contents[3], tail=(300, 301))
    assert isinstance(engine.plan(unseen, len(PREFIX), len(unseen.tokens) - 1), Reuse)


def test_planned_kv_is_the_estimate_of_each_span_and_its_following_segment():
    engine = KVComm(ROPE, PAPER)
    contents = _contents(8)
    for i in range(3):
        _teach(engine, contents[2 * i], contents[2 * i + 1], seed=10 + i)
    layout = _layout(contents[0], contents[3])  # both contents have bases, in a new pairing
    end = len(layout.tokens) - 1
    plan = engine.plan(layout, layout.spans[0][0] + 1, end)  # exact match ends inside span 0
    assert isinstance(plan, Reuse) and (plan.start, plan.end) == (layout.spans[0][0], end)
    pieces = []
    for j, (s, _) in enumerate(layout.spans):
        est = estimate(
            engine.bases.get(layout.content(j)),
            s,
            list(engine.anchors.get(engine.pool_key(layout, j))),
            layout.following(j),
            ROPE,
            content_ids=layout.content(j),
        )
        pieces += [est.content, est.following]
    want_k = torch.cat([p.k for p in pieces], 1)[:, : end - plan.start]
    want_v = torch.cat([p.v for p in pieces], 1)[:, : end - plan.start]
    got = plan.materialize(ROPE)
    torch.testing.assert_close(got.k, want_k)
    torch.testing.assert_close(got.v, want_v)

    # an exact match past span 0 (inside the segment after it) restarts at span 0; inside span 1
    # it restarts at span 1
    assert engine.plan(layout, layout.spans[0][1] + 1, end).start == layout.spans[0][0]
    assert engine.plan(layout, layout.spans[1][0] + 1, end).start == layout.spans[1][0]


def test_commit_activates_the_top_anchors():
    engine = KVComm(ROPE, ReuseConfig(threshold=1.0))
    contents = _contents(6)
    for i in range(2):
        _teach(engine, contents[2 * i], contents[2 * i + 1], seed=20 + i)
    plan = engine.plan(_layout(contents[0], contents[3]), len(PREFIX), 20)
    engine.commit(plan)
    for decision in plan.decisions:
        assert decision.activated and all(a.activations == 1 for a in decision.activated)


def test_memory_bound_holds_and_keeps_the_newest():
    one_prompt = KVComm(ROPE)
    contents = _contents(12)
    _teach(one_prompt, contents[0], contents[1], seed=0)
    budget = int(2.5 * one_prompt.nbytes)
    engine = KVComm(ROPE, ReuseConfig(max_bytes=budget))
    for i in range(6):
        _teach(engine, contents[2 * i], contents[2 * i + 1], seed=30 + i)
        assert engine.nbytes <= budget
    assert engine.bases.get(contents[11]) is not None
    assert 0 < engine.anchors.num_anchors < 12
    assert engine.nbytes == engine.report()["base_bytes"] + engine.report()["anchor_bytes"]


def test_memory_pressure_drops_stale_anchor_pools_before_a_fresh_base():
    contents = _contents(5)
    pairs = [(contents[0], contents[1]), (contents[2], contents[3])]
    dry = KVComm(ROPE)
    for i, pair in enumerate(pairs):
        _teach(dry, *pair, seed=i)
    fresh, answer = contents[4], _kv(len(contents[4]), seed=9)
    budget = dry.nbytes + answer.nbytes // 2  # the answer fits once one anchor goes
    engine = KVComm(ROPE, ReuseConfig(max_bytes=budget))
    for i, pair in enumerate(pairs):
        _teach(engine, *pair, seed=i)
    layouts = [_layout(*pair) for pair in pairs]
    engine.anchors.get(engine.pool_key(layouts[0], 1))  # span 1's pool: used lately
    engine.observe_output(fresh, answer, position=20)
    assert engine.nbytes <= budget
    assert engine.bases.get(fresh) is not None  # the newest base stays
    assert engine.anchors.get(engine.pool_key(layouts[0], 0)) is not None
    assert len(engine.anchors.get(engine.pool_key(layouts[0], 0))) == 1  # the stalest pool paid
    assert len(engine.anchors.get(engine.pool_key(layouts[0], 1))) == 2


def test_base_store_drops_the_least_recently_used_unprotected_base():
    store = BaseStore()
    for i in range(3):
        store.put((i,), _kv(1, seed=i))
    store.get((0,))  # order now 1, 2, 0
    protected = store.get((1,))  # order 2, 0, 1
    found = store.oldest(keep=lambda base: base is protected)
    assert found is not None
    store.pop(found[0])
    assert (2,) not in store and (0,) in store and (1,) in store
    assert store.oldest(keep=lambda base: True) is None


def test_output_base_is_keyed_by_its_tokens_with_and_without_the_last_in_the_position_0_frame():
    engine = KVComm(ROPE)
    kv = _kv(5, seed=3)
    engine.observe_output((5, 6, 7, 8, 9), kv, position=40)
    base = engine.bases.get((5, 6, 7, 8, 9))
    torch.testing.assert_close(rotate(base.k, 40, ROPE), kv.k, rtol=1e-5, atol=1e-5)
    # Quoted without the last sampled token (a stop token, or a token SGLang never fed back):
    # the same base, a view, counted once.
    shorter = engine.bases.get((5, 6, 7, 8))
    assert torch.equal(shorter.k, base.k[:, :4]) and torch.equal(shorter.v, base.v[:, :4])
    assert engine.base_bytes == base.nbytes
    assert engine.bases.get((5, 6, 7)) is None
    engine.clear()
    assert engine.nbytes == 0 and engine.report()["bases"] == 0


def test_reuse_on_smollm2_is_close_to_dense_prefill(hf_models):
    from sglang_kvcomm.assets.datasets import gsm8k

    model = hf_models("smollm2")
    enc = model.encode
    neutral, agent = enc("Here is a problem.\n"), enc("You are an inspector. Check this problem:\n")
    following = enc("\nYour answer:")
    questions = [enc(p.question) for p in gsm8k(limit=6)]
    newest = min(range(len(questions)), key=lambda i: len(questions[i]))
    engine = KVComm(model.rope)

    def dense(prefix: list[int], content: list[int]) -> tuple[PromptLayout, KV]:
        layout = PromptLayout.of(
            (*prefix, *content, *following), [(len(prefix), len(prefix) + len(content))]
        )
        return layout, model.prefill(list(layout.tokens)).kv

    for i, question in enumerate(questions):
        for prefix in (neutral, agent) if i != newest else (neutral,):
            layout, kv = dense(prefix, question)
            engine.observe_prefill(layout, lambda a, b, kv=kv: kv.tokens(slice(a, b)))

    layout, truth = dense(agent, questions[newest])
    end = len(layout.tokens) - 1
    plan = engine.plan(layout, len(agent), end)
    assert isinstance(plan, Reuse), plan
    assert plan.end == len(layout.tokens) - len(following)  # the final segment is prefilled
    truth = truth.tokens(slice(plan.start, plan.end))
    got = plan.materialize(model.rope)
    torch.testing.assert_close(got.k[0], truth.k[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.v[0], truth.v[0], rtol=1e-4, atol=1e-4)

    def err(kv: KV) -> float:
        return float((kv.k[1:] - truth.k[1:]).norm() / truth.k[1:].norm())

    base = engine.bases.get(tuple(questions[newest]))
    naive = KV(torch.cat([base.k, got.k[:, base.num_tokens :]], 1), got.v)  # unrotated
    assert err(got) < 0.5 * err(naive)
    assert engine.plan(layout, len(agent) - 1, end) == Fallback(
        "prefix not cached", f"exact match {len(agent) - 1} < first shared span at {len(agent)}"
    )


def test_anchors_record_the_pools_error_and_the_gate_refuses_above_the_threshold():
    """The first anchor of a pool joins an empty pool (nothing to measure); the next records
    ``held_out_error`` against the pool it joined. A threshold below the prediction refuses,
    naming it; the default plan reports the prediction it passed."""
    contents = _contents(6)
    engine = KVComm(ROPE, PAPER)
    _teach(engine, contents[0], contents[1], seed=1)
    _teach(engine, contents[2], contents[3], seed=2)
    layout = _layout(contents[4], contents[5], prefix=SIBLING)
    _observe(engine, layout, seed=3)  # the new contents' bases
    layout = _layout(contents[4], contents[5])
    for j in range(2):
        first, second = engine.anchors.get(engine.pool_key(layout, j))
        assert first.error is None
        torch.testing.assert_close(
            second.error.value, held_out_error(second, [first]), equal_nan=True
        )
    reuse = engine.plan(layout, layout.spans[0][0], len(layout.tokens) - 1)
    assert isinstance(reuse, Reuse) and 0 < reuse.gate_statistic <= 1
    strict = KVComm(ROPE, ReuseConfig(threshold=reuse.gate_statistic / 2, exact_final=0))
    strict.bases, strict.anchors = engine.bases, engine.anchors
    refused = strict.plan(layout, layout.spans[0][0], len(layout.tokens) - 1)
    assert refused.reason == "predicted error" and " > " in refused.detail

"""Matching weights and both gates on hand-built cases, against float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

from radix_anchor.anchor_pool import KV, Anchor
from radix_anchor.gate import activate, decide, decide_by_error
from radix_anchor.matching import blend, following_weights, placeholder_weights
from radix_anchor.transfer import HostReading

L, H, D = 2, 2, 4


def test_placeholder_weights_formula():
    q = torch.randn(L, 3, H, D)
    anchors = [torch.randn(L, 5, H, D) for _ in range(4)]
    got = placeholder_weights(q, anchors, tau=0.5)
    dist = torch.stack(
        [(q.double() - a[:, :3].double()).abs().mean(dim=(0, 2, 3)) for a in anchors]
    )
    want = torch.softmax(-dist / 0.5, dim=0)
    assert got.shape == (4, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def test_following_weights_formula_is_end_aligned():
    q = torch.randn(L, 3, H, D)
    anchors = [torch.randn(L, n, H, D) for n in (3, 6)]
    got = following_weights(q, anchors)
    want = torch.softmax(
        -torch.stack([(q.double() - a[:, -3:].double()).norm(dim=1) for a in anchors]), dim=0
    )
    assert got.shape == (2, L, H, D)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def test_identical_anchor_dominates_and_ties_split_evenly():
    q = torch.randn(L, 4, H, D)
    far = q + 10
    w = placeholder_weights(q, [far, q.clone(), far.clone()])
    assert torch.all(w[1] > 0.999)
    tie = placeholder_weights(q, [far, far.clone()])
    torch.testing.assert_close(tie, torch.full_like(tie, 0.5))


def test_top_k_keeps_the_closest():
    q = torch.zeros(L, 2, H, D)
    anchors = [q + 0.1, q + 5.0, q + 0.2]
    w = placeholder_weights(q, anchors, top_k=2)
    assert torch.all(w[1] == 0)
    torch.testing.assert_close(w.sum(0), torch.ones(2))
    with pytest.raises(ValueError):
        placeholder_weights(q, anchors, top_k=0)
    with pytest.raises(ValueError, match="no anchors"):
        placeholder_weights(q, [])


def test_blend_per_token_and_per_channel():
    tensors = [torch.full((L, 3, H, D), float(i)) for i in range(3)]
    per_token = torch.tensor([[1.0, 0, 0.5], [0, 1, 0.5], [0, 0, 0]])
    out = blend(per_token, tensors)
    assert out[:, 0].eq(0).all() and out[:, 1].eq(1).all() and out[:, 2].eq(0.5).all()
    per_channel = torch.zeros(3, L, H, D)
    per_channel[2] = 1
    assert blend(per_channel, tensors).eq(2).all()


def _anchor(v: torch.Tensor, activations: int = 0) -> Anchor:
    kv = KV(torch.zeros_like(v), v)
    return Anchor(
        base=kv,
        ph_offset=KV(torch.zeros_like(v), torch.zeros_like(v)),
        following=KV(torch.zeros(L, 1, H, D), torch.zeros(L, 1, H, D)),
        following_ids=(0,),
        position=0,
        activations=activations,
    )


def test_gate_warm_up_needs_two_covering_anchors():
    v = torch.randn(L, 4, H, D)
    assert not decide(v, [], gamma=0.3).shareable  # empty pool
    one = decide(v, [_anchor(v.clone())], gamma=1.0)
    assert not one.shareable and one.reason.startswith("warm-up: 1 anchor")
    short = decide(v, [_anchor(v[:, :3]), _anchor(v[:, :2])], gamma=1.0)
    assert not short.shareable and "0 anchor(s) cover 4 tokens" in short.reason


def test_gate_entropy_against_float64():
    v = torch.randn(L, 4, H, D)
    anchors = [_anchor(v + 0.05 * torch.randn_like(v)) for _ in range(3)]
    anchors.append(_anchor(torch.cat([v, torch.randn(L, 2, H, D)], dim=1)))  # longer is fine
    decision = decide(v, anchors, gamma=0.9, tau=0.2)
    dist = torch.stack([(v.double() - a.base.v[:, :4].double()).norm() for a in anchors])
    s = torch.softmax(-dist / 0.2, dim=0)
    entropy = float(-(s * torch.log2(s)).sum())
    assert decision.statistic == pytest.approx(entropy, rel=1e-5)
    assert decision.limit == pytest.approx(0.9 * math.log2(4))
    assert decision.shareable == (entropy <= 0.9 * 2)


def test_gate_flat_distribution_is_not_shareable_and_peaked_is():
    v = torch.randn(L, 4, H, D)
    flat = [_anchor(v + 3.0), _anchor(v - 3.0)]  # equidistant: H = 1 bit = log2(2)
    d = decide(v, flat, gamma=0.99)
    assert d.statistic == pytest.approx(1.0, abs=1e-6)
    assert not d.shareable and d.reason == "entropy"
    assert decide(v, flat, gamma=1.0).shareable  # H <= gamma * log2 N, inclusive
    peaked = [_anchor(v.clone()), _anchor(v + 3.0), _anchor(v - 3.0)]
    d = decide(v, peaked, gamma=0.1)
    assert d.shareable and d.statistic < 0.01
    assert d.activated == [peaked[0]]


def test_top_p_activation():
    v = torch.zeros(L, 1, H, D)
    # three anchors at distances 0, 0, 50: two share the mass, the far one gets none
    anchors = [_anchor(v.clone()), _anchor(v.clone()), _anchor(v + 25.0)]
    d = decide(v, anchors, gamma=1.0)
    assert d.shareable and d.activated == anchors[:2]
    activate(d)
    assert [a.activations for a in anchors] == [1, 1, 0]


def _measured(ids: tuple[int, ...], error: tuple[float, float] | None) -> Anchor:
    anchor = _anchor(torch.randn(L, len(ids), H, D))
    anchor.content_ids = ids
    anchor.error = None if error is None else HostReading.of(torch.tensor(error))
    return anchor


def test_error_gate_mixes_the_pool_errors_by_the_matched_share():
    anchors = [
        _measured((1, 2, 3), None),  # joined an empty pool: nothing measured
        _measured((1, 4), (0.1, 0.5)),
        _measured((5, 6, 7), (0.3, float("nan"))),  # its every token had a match
    ]
    content = (1, 2, 8, 9)  # half its tokens have a same-id match
    d = decide_by_error(content, anchors, threshold=1.0)
    e_matched, e_other = (0.1 + 0.3) / 2, 0.5
    assert d.shareable and d.statistic == pytest.approx(
        math.sqrt(0.5 * e_matched**2 + 0.5 * e_other**2), rel=1e-6
    )
    assert d.limit == 1.0
    # the anchors holding the content's ids: shares 2/3 and 1/3 of the hits; top-p 0.9 takes both
    assert d.activated == anchors[:2]
    strict = decide_by_error(content, anchors, threshold=d.statistic * 0.99)
    assert not strict.shareable and strict.reason == "predicted error"
    assert decide_by_error(content, anchors, threshold=d.statistic + 1e-6).shareable
    # every token matched: only the matched-class error counts
    assert decide_by_error((1, 4), anchors, 1.0).statistic == pytest.approx(e_matched, rel=1e-6)


def test_error_gate_warm_up():
    one = decide_by_error((1,), [_measured((1,), (0.1, 0.1))], threshold=1.0)
    assert not one.shareable and one.reason.startswith("warm-up: 1 anchor(s) pooled")
    unmeasured = decide_by_error((1,), [_measured((1,), None), _measured((2,), None)], 1.0)
    assert not unmeasured.shareable and "0 with a measured error" in unmeasured.reason

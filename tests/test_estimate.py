"""Offset estimation on synthetic KV with known answers."""

from __future__ import annotations

import pytest
import torch

from radix_anchor.anchor_pool import KV, Anchor
from radix_anchor.estimate import EstimateOptions, estimate, held_out_error
from radix_anchor.matching import following_weights
from radix_anchor.rope import RopeSpec, rotate

L, H, D, T, S = 3, 2, 8, 5, 4
ROPE = RopeSpec.from_theta(D, 1e4)
FOLLOW_IDS = (11, 12, 13, 14)


def _rand(tokens: int) -> KV:
    return KV(torch.randn(L, tokens, H, D), torch.randn(L, tokens, H, D))


def _anchor(base: KV, offset: KV, following: KV, position: int = 0, ids=FOLLOW_IDS) -> Anchor:
    return Anchor(
        base=base, ph_offset=offset, following=following, following_ids=ids, position=position
    )


def test_shared_offset_is_added_and_layer_zero_is_exact():
    base, offset, follow = _rand(T), _rand(T), _rand(S)
    anchors = [
        _anchor(
            _rand(T + i),
            KV(
                torch.cat([offset.k, torch.randn(L, i, H, D)], 1),
                torch.cat([offset.v, torch.randn(L, i, H, D)], 1),
            ),
            follow,
        )
        for i in range(3)
    ]  # same first-T offsets, different lengths
    est = estimate(base, 17, anchors, FOLLOW_IDS, ROPE)
    want_k = rotate(base.k + offset.k, 17, ROPE)
    torch.testing.assert_close(est.content.k[1:], want_k[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(est.content.v[1:], (base.v + offset.v)[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(est.content.k[0], rotate(base.k, 17, ROPE)[0])
    torch.testing.assert_close(est.content.v[0], base.v[0])
    # every anchor saw the same following KV: the blend returns it, rotated after the content
    torch.testing.assert_close(
        est.following.k, rotate(follow.k, 17 + T, ROPE), rtol=1e-5, atol=1e-5
    )


def test_following_blend_matches_float64_formula():
    base = _rand(T)
    anchors = [_anchor(_rand(T), _rand(T), _rand(S)) for _ in range(3)]
    est = estimate(base, 3, anchors, FOLLOW_IDS, ROPE)
    wv = following_weights(base.v.double(), [a.base.v.double() for a in anchors])
    want_v = sum(wv[n][:, None] * anchors[n].following.v.double() for n in range(3))
    torch.testing.assert_close(est.following.v[1:].double(), want_v[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(est.following.v[0], anchors[0].following.v[0])


def test_estimate_is_position_independent():
    base = _rand(T)
    anchors = [_anchor(_rand(T), _rand(T), _rand(S), position=p) for p in (4, 90, 300)]
    a = estimate(base, 10, anchors, FOLLOW_IDS, ROPE)
    b = estimate(base, 510, anchors, FOLLOW_IDS, ROPE)
    torch.testing.assert_close(rotate(a.content.k, 500, ROPE), b.content.k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.content.v, b.content.v)
    torch.testing.assert_close(
        rotate(a.following.k, 500, ROPE), b.following.k, rtol=1e-4, atol=1e-4
    )


def test_authors_mode_agrees_only_where_positions_agree():
    """The authors' code keeps anchor keys in the frame where they were observed. With a single
    anchor (weights trivially 1) observed where the content goes, that frame is the target's and
    both modes agree; values never carry position, so they always agree."""
    base, template = _rand(T), _rand(S)
    authors = EstimateOptions(authors_code=True)
    anchor = _anchor(_rand(T), _rand(T), _rand(S), position=40)
    anchor.following.k[0], anchor.following.v[0] = template.k[0], template.v[0]  # exact layer 0
    for start, same in ((40, True), (400, False)):
        ours = estimate(base, start, [anchor], FOLLOW_IDS, ROPE)
        theirs = estimate(base, start, [anchor], FOLLOW_IDS, ROPE, authors, following_base=template)
        for mine, other in ((ours.content, theirs.content), (ours.following, theirs.following)):
            torch.testing.assert_close(other.v, mine.v, rtol=1e-5, atol=1e-5)
            assert torch.allclose(other.k, mine.k, rtol=1e-4, atol=1e-4) == same


def test_ablations_and_fallbacks():
    base, template = _rand(T), _rand(S)
    anchors = [_anchor(_rand(T), _rand(T), _rand(S)) for _ in range(2)]
    rotation_only = estimate(
        base,
        9,
        anchors,
        FOLLOW_IDS,
        ROPE,
        EstimateOptions(placeholder_offset=False, following_offset=False),
        following_base=template,
    )
    torch.testing.assert_close(rotation_only.content.k, rotate(base.k, 9, ROPE))
    torch.testing.assert_close(rotation_only.following.k, rotate(template.k, 9 + T, ROPE))
    with pytest.raises(ValueError, match="following_base"):
        estimate(base, 9, anchors, FOLLOW_IDS, ROPE, EstimateOptions(following_offset=False))
    with pytest.raises(ValueError, match="following"):  # no anchor has these following tokens
        estimate(base, 9, anchors, (1, 2, 3, 4), ROPE)
    other = estimate(base, 9, anchors, (1, 2, 3, 4), ROPE, following_base=template)
    torch.testing.assert_close(other.following.v, template.v)
    # anchors shorter than the content are ignored; with none left the content is rotation only
    lonely = estimate(_rand(T + 3), 9, anchors, FOLLOW_IDS, ROPE, following_base=template)
    assert lonely.content.num_tokens == T + 3


def test_dtype_is_kept():
    base = KV(torch.randn(L, T, H, D).half(), torch.randn(L, T, H, D).half())
    anchors = [_anchor(KV(a.k.half(), a.v.half()), _rand(T), _rand(S)) for a in (_rand(T),) * 2]
    est = estimate(base, 2, anchors, FOLLOW_IDS, ROPE)
    assert est.content.k.dtype == torch.float16 and est.following.v.dtype == torch.float16


def _token_matched_reference(ids, anchors):
    """Token by token in float64: the mean offset over every (anchor, index) holding the same
    id; else over the anchors long enough to have index t; else over every pooled token."""
    ks, vs = [], []
    everything = [(a, i) for a in anchors for i in range(a.length)]
    for t, token in enumerate(ids):
        same = [(a, i) for a in anchors for i, x in enumerate(a.content_ids) if x == token]
        rows = same or [(a, t) for a in anchors if a.length > t] or everything
        ks.append(sum(a.ph_offset.k[:, i].double() for a, i in rows) / len(rows))
        vs.append(sum(a.ph_offset.v[:, i].double() for a, i in rows) / len(rows))
    return torch.stack(ks, 1), torch.stack(vs, 1)


@pytest.mark.parametrize("content_ids", [(), (7, 7, 3, 9, 1)], ids=["unknown ids", "known ids"])
def test_anchors_without_ids_and_contents_without_ids_take_the_index_mean(content_ids):
    """An anchor whose ids are unknown gives no same-id rows but counts at its indices; a
    content whose ids are unknown takes the index mean everywhere (the pool mean past it)."""
    torch.manual_seed(4)
    pooled_ids = [(7, 3, 3, 8), ()]  # the second anchor's ids are unknown
    anchors = [
        Anchor(
            base=_rand(4),
            ph_offset=_rand(4),
            following=_rand(S),
            following_ids=FOLLOW_IDS,
            position=0,
            content_ids=ids,
        )
        for ids in pooled_ids
    ]
    base, template = _rand(5), _rand(S)
    est = estimate(
        base, 2, anchors, FOLLOW_IDS, ROPE, following_base=template, content_ids=content_ids
    )
    ids = content_ids or (-1,) * 5  # no pooled id is negative
    want_k, want_v = _token_matched_reference(ids, anchors)
    close = {"rtol": 1e-5, "atol": 1e-5}  # float32 means against float64
    got_v, got_k = est.content.v[1:].double(), est.content.k[1:].double()
    torch.testing.assert_close(got_v, (base.v.double() + want_v)[1:], **close)
    torch.testing.assert_close(got_k, rotate(base.k.double() + want_k, 2, ROPE)[1:], **close)


def test_token_matched_offsets_match_a_token_by_token_reference():
    torch.manual_seed(3)
    length = 7  # longer than every anchor below: the last token takes the pool mean
    ids = (5, 9, 5, 2, 40, 9, 41)  # 40 is nowhere in the pool; 41 sits past every anchor
    pooled_ids = [(9, 1, 5, 3, 3, 2), (2, 2, 7, 8), (6, 5, 0, 1, 4)]
    anchors = [
        Anchor(
            base=_rand(len(c)),
            ph_offset=_rand(len(c)),
            following=_rand(S),
            following_ids=FOLLOW_IDS,
            position=0,
            content_ids=c,
        )
        for c in pooled_ids
    ]
    base, template = _rand(length), _rand(S)  # no anchor covers 7 tokens: a template follows
    est = estimate(base, 13, anchors, FOLLOW_IDS, ROPE, following_base=template, content_ids=ids)
    want_k, want_v = _token_matched_reference(ids, anchors)
    torch.testing.assert_close(
        est.content.k[1:].double(), rotate(base.k.double() + want_k, 13, ROPE)[1:]
    )
    torch.testing.assert_close(est.content.v[1:].double(), (base.v.double() + want_v)[1:])
    torch.testing.assert_close(est.content.k[0], rotate(base.k, 13, ROPE)[0])  # layer 0 exact
    # the paper's estimate is still there, and differs
    paper = estimate(
        base,
        13,
        anchors,
        FOLLOW_IDS,
        ROPE,
        EstimateOptions(placeholder="index"),
        following_base=template,
        content_ids=ids,
    )
    assert not torch.allclose(paper.content.v, est.content.v)
    with pytest.raises(ValueError, match="placeholder estimate"):
        EstimateOptions(placeholder="nearest")


def test_held_out_error_matches_a_float64_reference():
    """The error the pool's estimate makes on a newcomer's content, per class of token (same id
    somewhere in the pool, or not), against the token-by-token reference above."""
    torch.manual_seed(4)
    pooled_ids = [(9, 1, 5, 3, 3, 2), (2, 2, 7, 8)]
    others = [
        Anchor(_rand(len(c)), _rand(len(c)), _rand(S), FOLLOW_IDS, 0, content_ids=c)
        for c in pooled_ids
    ]
    ids = (5, 9, 40, 2, 41)  # 40 and 41 are in no other anchor
    newcomer = Anchor(_rand(5), _rand(5), _rand(S), FOLLOW_IDS, 0, content_ids=ids)
    want_k, want_v = _token_matched_reference(ids, others)
    offset, base = newcomer.ph_offset, newcomer.base
    err = sum(
        (guess - o.double())[1:].square().sum((0, 2, 3))
        for guess, o in ((want_k, offset.k), (want_v, offset.v))
    )
    ref = sum(
        (b.double() + o.double())[1:].square().sum((0, 2, 3))
        for b, o in ((base.k, offset.k), (base.v, offset.v))
    )
    matched = torch.tensor([x in {i for c in pooled_ids for i in c} for x in ids])
    want = [(err[m].sum() / ref[m].sum()).sqrt() for m in (matched, ~matched)]
    got = held_out_error(newcomer, others)
    assert got.dtype == torch.float32 and got.shape == (2,)
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-5, atol=1e-7)
    every_id_known = Anchor(_rand(2), _rand(2), _rand(S), FOLLOW_IDS, 0, content_ids=(9, 2))
    assert torch.isnan(held_out_error(every_id_known, others)[1])  # no token of that class

"""Anchor pools: capacity exactly V, LFU-in-the-oldest-W eviction, byte accounting, frames."""

from __future__ import annotations

import pytest
import torch

from radix_anchor.anchor_pool import KV, Anchor, AnchorPool, AnchorStore
from radix_anchor.rope import RopeSpec, rotate

L, H, D = 2, 3, 8


def _kv(tokens: int, fill: float = 0.0, dtype=torch.float32) -> KV:
    return KV(
        torch.full((L, tokens, H, D), fill, dtype=dtype),
        torch.full((L, tokens, H, D), fill, dtype=dtype),
    )


def _anchor(tokens: int = 4, activations: int = 0, following: int = 2) -> Anchor:
    return Anchor(
        base=_kv(tokens),
        ph_offset=_kv(tokens),
        following=_kv(following),
        following_ids=tuple(range(following)),
        position=0,
        activations=activations,
    )


def test_capacity_is_exactly_v():
    pool = AnchorPool(capacity=3, window=2)
    added = [_anchor() for _ in range(3)]
    assert [pool.add(a) for a in added] == [None, None, None]
    assert len(pool) == 3  # V reached exactly, nothing evicted
    evicted = pool.add(_anchor())
    assert evicted is added[0]  # all at 0 activations: the oldest goes
    assert len(pool) == 3


def test_eviction_is_least_activated_among_the_w_oldest():
    pool = AnchorPool(capacity=4, window=3)
    a, b, c, d = (_anchor(activations=n) for n in (5, 1, 3, 0))
    for x in (a, b, c, d):
        pool.add(x)
    # d has the fewest activations but is outside the window of the 3 oldest (a, b, c)
    assert pool.add(_anchor()) is b
    assert list(pool)[:3] == [a, c, d]


def test_eviction_ties_drop_the_oldest():
    pool = AnchorPool(capacity=3, window=3)
    a, b, c = (_anchor(activations=2) for _ in range(3))
    for x in (a, b, c):
        pool.add(x)
    assert pool.add(_anchor()) is a


def test_window_of_one_is_fifo():
    pool = AnchorPool(capacity=2, window=1)
    a, b = _anchor(activations=9), _anchor(activations=0)
    pool.add(a)
    pool.add(b)
    assert pool.add(_anchor()) is a


@pytest.mark.parametrize(("capacity", "window"), [(1, 1), (3, 0), (3, 4)])
def test_bad_pool_settings(capacity, window):
    with pytest.raises(ValueError):
        AnchorPool(capacity, window)


def test_compatible_anchors_cover_the_content():
    pool = AnchorPool(capacity=5, window=2)
    short, exact, long = _anchor(3), _anchor(5), _anchor(9)
    for x in (short, exact, long):
        pool.add(x)
    assert pool.compatible(5) == [exact, long]
    assert pool.compatible(10) == []
    assert AnchorPool(2, 1).compatible(1) == []  # empty pool


def test_bytes_are_accounted():
    anchor = Anchor(
        base=_kv(4, dtype=torch.float16),
        ph_offset=_kv(4, dtype=torch.float16),
        following=_kv(3, dtype=torch.float16),
        following_ids=(1, 2, 3),
        position=0,
    )
    per_token = 2 * L * H * D * 2  # K and V, fp16
    assert anchor.nbytes == per_token * (4 + 4 + 3)
    store = AnchorStore(capacity=2, window=1)
    store.pool(("agent-a", 0)).add(anchor)
    store.pool(("agent-b", 0)).add(_anchor(4))
    assert store.num_anchors == 2
    assert store.nbytes == anchor.nbytes + _anchor(4).nbytes
    store.clear()
    assert store.nbytes == 0 and store.get(("agent-a", 0)) is None


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="same shape"):
        Anchor(base=_kv(4), ph_offset=_kv(3), following=_kv(2), following_ids=(0, 1), position=0)
    with pytest.raises(ValueError, match="token ids"):
        Anchor(base=_kv(4), ph_offset=_kv(4), following=_kv(2), following_ids=(0,), position=0)
    with pytest.raises(ValueError, match="layers, tokens"):
        KV(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))


def test_from_dense_stores_the_position_zero_frame():
    spec = RopeSpec.from_theta(D, 1e4)
    base = KV(
        torch.randn(L, 5, H, D, dtype=torch.float64), torch.randn(L, 5, H, D, dtype=torch.float64)
    )
    true_offset = KV(torch.randn_like(base.k), torch.randn_like(base.v))
    following0 = KV(
        torch.randn(L, 3, H, D, dtype=torch.float64), torch.randn(L, 3, H, D, dtype=torch.float64)
    )
    position = 40
    measured = KV(rotate(base.k + true_offset.k, position, spec), base.v + true_offset.v)
    following = KV(rotate(following0.k, position + 5, spec), following0.v)
    anchor = Anchor.from_dense(base, measured, following, (7, 8, 9), position, spec)
    torch.testing.assert_close(anchor.ph_offset.k, true_offset.k)
    torch.testing.assert_close(anchor.ph_offset.v, true_offset.v)
    torch.testing.assert_close(anchor.following.k, following0.k)
    assert anchor.position == position and anchor.length == 5


def test_core_does_not_import_sglang():
    import subprocess
    import sys

    code = (
        "import sys, radix_anchor.estimate, radix_anchor.gate, radix_anchor.anchor_pool; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sglang', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

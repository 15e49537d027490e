"""The Triton kernels against the torch reference, on CPU under ``TRITON_INTERPRET=1``.

Fresh random inputs every run; destination pools are poisoned (NaN) before the launch and every
written row is checked, every other row left untouched; odd lengths, shuffled non-contiguous
slot indices, both RoPE layouts, fp32 / bf16 / fp16 pools, GQA shapes of SmolLM2, Qwen2-0.5B
and Llama-3-8B. The reference itself is checked against float64 in ``test_estimate.py`` /
``test_rope.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kvcomm_kernels
from radix_anchor.anchor_pool import KV
from radix_anchor.estimate import Recipe, apply
from radix_anchor.rope import RopeSpec, rotate
from radix_anchor.token_index import Taps, dense_taps

# (layers, kv heads, head dim): SmolLM2-135M, Qwen2-0.5B, Llama-3-8B (layers cut to keep the
# interpreter fast where noted: the layer loop is the same code for every layer >= 1)
SHAPES = {"smollm2": (30, 3, 64), "qwen2-0.5b": (24, 2, 64), "llama3-8b": (4, 8, 128)}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
POOL_SLOTS = 97


@pytest.fixture(scope="module", autouse=True)
def kernels_backend():
    """The kernels run on CPU tensors in Triton's interpreter (conftest turns it on)."""
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
    saved = os.environ.get(kvcomm_kernels.ENV_VAR)
    yield
    if saved is None:
        os.environ.pop(kvcomm_kernels.ENV_VAR, None)
    else:
        os.environ[kvcomm_kernels.ENV_VAR] = saved


def _use(backend: str) -> None:
    os.environ[kvcomm_kernels.ENV_VAR] = backend


def _pool(shape, dtype):
    layers, heads, dim = shape
    nan = float("nan")
    return (
        [torch.full((POOL_SLOTS, heads, dim), nan, dtype=dtype) for _ in range(layers)],
        [torch.full((POOL_SLOTS, heads, dim), nan, dtype=dtype) for _ in range(layers)],
    )


def _kv(layers, tokens, heads, dim, dtype) -> KV:
    return KV(
        torch.randn(layers, tokens, heads, dim).to(dtype),
        torch.randn(layers, tokens, heads, dim).to(dtype),
    )


def _sparse_taps(tokens: int, rows: list[int]) -> Taps:
    """Random taps: 0 to 5 per token, over sources of ``rows`` rows each (a 1-row source like
    the pool mean among them), weights summing to 1 per token."""
    counts = torch.randint(0, 6, (tokens,)).numpy()
    source = np.concatenate([np.random.randint(0, len(rows), c) for c in counts]).astype(np.int64)
    row = np.array([np.random.randint(0, rows[s]) for s in source], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    weight = np.random.rand(len(source)).astype(np.float32)
    return Taps(indptr, source, row, weight, False)


def _recipe(shape, dtype, tokens, following, anchors, taps="dense") -> Recipe:
    layers, heads, dim = shape
    offsets = [_kv(layers, tokens + extra, heads, dim, dtype) for extra in range(anchors)]
    follows = [_kv(layers, following, heads, dim, dtype) for _ in range(max(anchors, 1))]
    fk = torch.softmax(torch.randn(len(follows), layers, heads, dim), 0)
    fv = torch.softmax(torch.randn(len(follows), layers, heads, dim), 0)
    base = _kv(layers, tokens, heads, dim, dtype)
    if not anchors:
        return Recipe(base, [], None, None, None, follows, fk, fv)
    if taps == "dense":
        plan = dense_taps(anchors, tokens)
        wk, wv = (torch.softmax(torch.randn(anchors, tokens), 0).t().reshape(-1) for _ in "kv")
    else:
        offsets.append(_kv(layers, 1, heads, dim, dtype))
        plan = _sparse_taps(tokens, [o.num_tokens for o in offsets])
        wk, wv = torch.from_numpy(plan.weight), torch.rand(len(plan.weight))
    return Recipe(base, offsets, plan, wk, wv, follows, fk, fv)


def _slots(n: int, taken: torch.Tensor | None = None) -> torch.Tensor:
    free = torch.randperm(POOL_SLOTS)
    if taken is not None:
        free = free[~torch.isin(free, taken)]
    return free[: 2 * n : 2]  # shuffled, a strided (non-contiguous) view


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["neox", "interleaved"])
@pytest.mark.parametrize("taps", ["dense", "sparse"])
def test_write_recipe_matches_the_reference(model, dtype, layout, taps):
    shape = SHAPES[model]
    rope = RopeSpec.from_theta(shape[2], 5e5, layout)
    tokens, following, position = 23, 5, 1234  # odd lengths, a far position
    recipe = _recipe(shape, dtype, tokens, following, anchors=3, taps=taps)
    content = _slots(tokens)
    fol = _slots(following - 1, taken=content)  # the last following token is cut off
    assert not content.is_contiguous() or content.numel() == 1
    pools = {}
    for backend in ("torch", "triton"):
        _use(backend)
        pools[backend] = _pool(shape, dtype)
        kvcomm_kernels.write_recipe(*pools[backend], recipe, position, content, fol, rope)
    written = torch.cat([content, fol])
    untouched = torch.ones(POOL_SLOTS, dtype=torch.bool)
    untouched[written] = False
    for want, got in zip(pools["torch"], pools["triton"], strict=True):  # K layers, V layers
        for w, g in zip(want, got, strict=True):
            assert not g[written].isnan().any()  # every destination row fully written
            assert g[untouched].isnan().all()  # nothing else touched
            torch.testing.assert_close(
                g[written].float(), w[written].float(), rtol=TOL[dtype], atol=TOL[dtype]
            )


def test_write_recipe_without_placeholder_offsets_is_the_rotated_base():
    shape, dtype = SHAPES["smollm2"], torch.float32
    rope = RopeSpec.from_theta(shape[2], 1e4)
    recipe = _recipe(shape, dtype, tokens=9, following=3, anchors=0)
    content = _slots(9)
    _use("triton")
    pool_k, pool_v = _pool(shape, dtype)
    kvcomm_kernels.write_recipe(pool_k, pool_v, recipe, 40, content, content[:0], rope)
    want = rotate(recipe.base.k, 40, rope)
    for layer in range(shape[0]):
        torch.testing.assert_close(pool_k[layer][content], want[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool_v[layer][content], recipe.base.v[layer])
    assert apply(recipe, 40, rope).content.k.shape == recipe.base.k.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [0, -517])
def test_gather_matches_the_reference(dtype, shift):
    shape = SHAPES["qwen2-0.5b"]
    rope = RopeSpec.from_theta(shape[2], 1e6)
    pool_k = [torch.randn(POOL_SLOTS, *shape[1:]).to(dtype) for _ in range(shape[0])]
    pool_v = [torch.randn(POOL_SLOTS, *shape[1:]).to(dtype) for _ in range(shape[0])]
    slots = _slots(31)
    got = {}
    for backend in ("torch", "triton"):
        _use(backend)
        got[backend] = kvcomm_kernels.gather(pool_k, pool_v, slots, shift, rope)
    torch.testing.assert_close(
        got["triton"].k.float(), got["torch"].k.float(), rtol=TOL[dtype], atol=TOL[dtype]
    )
    torch.testing.assert_close(got["triton"].v, got["torch"].v)


def test_unknown_backend_is_refused():
    _use("cuda-magic")
    with pytest.raises(ValueError, match="KVCOMM_KERNELS"):
        kvcomm_kernels.backend_for(torch.device("cpu"))
    _use("auto")
    assert kvcomm_kernels.backend_for(torch.device("cpu")) == "torch"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pool_write_of_a_planned_reuse_is_its_materialized_kv(backend):
    from types import SimpleNamespace

    from radix_anchor.prompt import PromptLayout
    from radix_anchor.reuse import KVComm, ReuseConfig
    from sglang_kvcomm.kv_pool import PoolKV

    layers, heads, dim = SHAPES["qwen2-0.5b"]
    rope = RopeSpec.from_theta(dim, 1e6)
    engine = KVComm(rope, ReuseConfig(threshold=1.0, exact_final=0))  # every token estimated
    between, tail = (4, 5), (6, 7, 8)

    def layout(a: int, b: int, prefix: tuple[int, ...] = (1, 2, 3)) -> PromptLayout:
        first, second = tuple(range(100 + a, 107 + a)), tuple(range(300 + b, 305 + b))
        tokens = (*prefix, *first, *between, *second, *tail)
        return PromptLayout.of(tokens, [(3, 10), (12, 17)])

    for i in range(3):  # a sibling's prefill gives the bases, this template's the anchors
        for prefix in ((9, 9, 9), (1, 2, 3)):
            measured = _kv(layers, 20, heads, dim, torch.float32)
            engine.observe_prefill(
                layout(10 * i, 10 * i, prefix), lambda a, b, m=measured: m.tokens(slice(a, b))
            )
    reuse = engine.plan(layout(0, 20), exact_len=3, end=19)  # new pairing; the last token left
    _use(backend)
    pool = PoolKV(
        SimpleNamespace(
            *(),
            **dict(
                zip(
                    ("k_buffer", "v_buffer"),
                    _pool((layers, heads, dim), torch.float32),
                    strict=True,
                )
            ),
            dtype=torch.float32,
            store_dtype=torch.float32,
        )
    )
    slots = _slots(reuse.num_tokens)
    pool.write(reuse, slots, rope)
    want = reuse.materialize(rope)
    got = pool.read(slots)
    torch.testing.assert_close(got.k, want.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.v, want.v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_anchor_distances_match_the_reference(dtype):
    from radix_anchor.matching import anchor_distances

    layers, heads, dim = SHAPES["llama3-8b"]
    query = _kv(layers, 19, heads, dim, dtype)
    anchors = [_kv(layers, 19 + extra, heads, dim, dtype) for extra in (0, 3, 8)]
    _use("triton")
    got = kvcomm_kernels.anchor_distances(query, anchors)
    want = anchor_distances(query, anchors)
    for name in ("placeholder_k", "placeholder_v", "following_k", "following_v", "values"):
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4, msg=name
        )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_warm_up_runs_the_reuse_path_on_the_padding_slot_only(backend):
    from types import SimpleNamespace

    from sglang_kvcomm.kv_pool import PoolKV

    layers, heads, dim = SHAPES["qwen2-0.5b"]
    pool_k, pool_v = _pool((layers, heads, dim), torch.bfloat16)
    for buf in (*pool_k, *pool_v):
        buf[0] = 0.0  # SGLang's padding slot
    _use(backend)
    pool = PoolKV(
        SimpleNamespace(
            k_buffer=pool_k, v_buffer=pool_v, dtype=torch.bfloat16, store_dtype=torch.bfloat16
        )
    )
    pool.warm_up(RopeSpec.from_theta(dim, 1e6))
    for buf in (*pool_k, *pool_v):
        assert not buf[0].isnan().any()
        assert buf[1:].isnan().all()  # every real slot untouched

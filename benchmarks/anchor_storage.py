"""Copies or pinned pool slots for base KV and anchors: bytes and time, measured side by side.

The server keeps base KV and anchors as copies in the position-0 frame (``radix_anchor.reuse``).
The alternative keeps references to the KV pool's slots (tree nodes pinned) plus a position,
paying no extra bytes but a gather and a de-rotation every time the data is used: each gate
decision and estimate reads every anchor of the pool. This script times both on a KV pool
shaped like a real model's, through the same ``PoolKV`` the server uses:

  copy:   once per anchor  read(slots) + rotate(-position)          bytes: a copy
  pinned: per reuse plan   N anchors x (read(slots) + rotate(-pos))  bytes: 0 (slots held)

    python benchmarks/anchor_storage.py [--model smollm2] [--tokens 128] [--anchors 8]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from report import format_table
from transformers import AutoConfig

from radix_anchor.rope import RopeSpec, rotate
from sglang_kvcomm.assets.models import model_dir
from sglang_kvcomm.kv_pool import PoolKV


def timed(fn, repeat: int) -> float:  # noqa: ANN001
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per anchor (content)")
    parser.add_argument("--anchors", type=int, default=8, help="anchors read per reuse plan")
    parser.add_argument("--pool-slots", type=int, default=200_000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)

    config = AutoConfig.from_pretrained(model_dir(args.model))
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    dim = config.hidden_size // config.num_attention_heads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    shape = (args.pool_slots, heads, dim)
    pool = PoolKV(
        SimpleNamespace(
            k_buffer=[torch.randn(shape, dtype=dtype, device=device) for _ in range(layers)],
            v_buffer=[torch.randn(shape, dtype=dtype, device=device) for _ in range(layers)],
            dtype=dtype,
            store_dtype=dtype,
        )
    )
    rope = RopeSpec.from_hf_config(config)
    slots = torch.randperm(args.pool_slots, device=device)[: args.tokens]

    def capture() -> None:
        kv = pool.read(slots)
        rotate(kv.k, -300, rope)

    def pinned_plan() -> None:
        for _ in range(args.anchors):
            capture()

    copy_s = timed(capture, args.repeat)
    pinned_s = timed(pinned_plan, args.repeat)
    per_token = 2 * layers * heads * dim * torch.finfo(dtype).bits // 8
    anchor_bytes = 2 * args.tokens * per_token  # placeholder offset + base (following is small)
    print(
        format_table(
            [
                "storage",
                "extra bytes / anchor",
                "cost when captured (ms)",
                "cost per reuse plan (ms)",
            ],
            [
                ["copy (ours)", f"{anchor_bytes / 2**20:.2f} MiB", 1000 * copy_s, 0.0],
                ["pinned slots", "0 (pool slots held)", 0.0, 1000 * pinned_s],
            ],
        )
    )
    print(
        f"\n{args.model}: {layers} layers x {heads} KV heads x {dim} dims, {args.dtype}, "
        f"{per_token / 1024:.1f} KiB per token (K+V), {args.tokens} tokens per anchor, "
        f"{args.anchors} anchors per plan, device {device}"
    )


if __name__ == "__main__":
    main()

"""The reuse path's kernels against the GPU's copy bandwidth, measured side by side in one run.

For Llama-3.1-8B shapes (32 layers, 8 KV heads, head_dim 128, bf16 pool) and spans of 256 to
4096 tokens with 1 to 20 anchors, times ``kvcomm_kernels.write_recipe`` (content: base +
weighted placeholder offsets, RoPE shift, scatter into shuffled pool slots, all layers) with the
torch reference and with Triton, counts the bytes it must move (read base and N offsets, write
the pool rows; K and V) and divides by time; the device-to-device copy bandwidth of the same GPU
(``Tensor.copy_`` of 1 GiB) is measured in the same run as the bound. Then the full stitch of
the paper's agent-5 prompt (512 fixed + 1024 input + 4 x 512 responses, ~3.6K tokens; gate,
weights and writes through ``radix_anchor.reuse`` and ``PoolKV``), with each backend.

    python benchmarks/kernel_bench.py [--out DIR] [--tokens 256 1024 4096] [--anchors 1 5 20]

Needs CUDA (the numbers mean nothing on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import kvcomm_kernels
from radix_anchor.anchor_pool import KV
from radix_anchor.estimate import EstimateOptions, Recipe
from radix_anchor.prompt import PromptLayout
from radix_anchor.reuse import KVComm, Reuse, ReuseConfig
from radix_anchor.rope import RopeSpec
from radix_anchor.token_index import dense_taps
from sglang_kvcomm.kv_pool import PoolKV

LAYERS, HEADS, DIM = 32, 8, 128
ROPE = RopeSpec.from_hf_config(
    {
        "rope_theta": 500000.0,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
)


def cuda_ms(fn, repeat: int = 20) -> float:  # noqa: ANN001
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def copy_bandwidth(dtype: torch.dtype) -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").view(dtype)
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def kv(tokens: int, dtype: torch.dtype) -> KV:
    shape = (LAYERS, tokens, HEADS, DIM)
    return KV(
        torch.randn(shape, device="cuda").to(dtype), torch.randn(shape, device="cuda").to(dtype)
    )


def pool(slots: int, dtype: torch.dtype) -> SimpleNamespace:
    bufs = [
        [torch.zeros(slots, HEADS, DIM, dtype=dtype, device="cuda") for _ in range(LAYERS)]
        for _ in range(2)
    ]
    return SimpleNamespace(k_buffer=bufs[0], v_buffer=bufs[1], dtype=dtype, store_dtype=dtype)


def content_recipe(tokens: int, anchors: int, dtype: torch.dtype) -> Recipe:
    """The paper's estimate: every anchor at every token's index (dense taps)."""
    follows = [kv(1, dtype)]
    w = torch.softmax(torch.randn(anchors, tokens, device="cuda"), 0).t().reshape(-1)
    fk = torch.ones(1, LAYERS, HEADS, DIM, device="cuda")
    return Recipe(
        kv(tokens, dtype),
        [kv(tokens, dtype) for _ in range(anchors)],
        dense_taps(anchors, tokens),
        w,
        w.clone(),
        follows,
        fk,
        fk.clone(),
    )


def backends(names: list[str]):  # noqa: ANN201
    for name in names:
        os.environ[kvcomm_kernels.ENV_VAR] = name
        yield name


def agent5_engine(
    dtype: torch.dtype, anchors: int, placeholder: str
) -> tuple[KVComm, PromptLayout]:
    """A pool warmed with ``anchors`` dense observations of the agent-5 template, and a new
    prompt whose contents all have base KV."""
    fixed = [list(range(1, 513)), [7] * 8, [8] * 8, [9] * 8, [10] * 8, [11] * 16]
    lengths = [1024, 512, 512, 512, 512]
    engine = KVComm(
        ROPE,
        ReuseConfig(
            threshold=1.0,
            max_anchors=max(anchors, 2),
            window=min(5, max(anchors, 2)),
            max_bytes=1 << 40,
            estimate=EstimateOptions(placeholder=placeholder),
        ),
        distances=kvcomm_kernels.anchor_distances,
    )  # as the server

    def prompt(seed: int) -> PromptLayout:
        tokens, spans = list(fixed[0]), []
        for i, n in enumerate(lengths):
            first = 100_000 * (i + 1) + 10_000 * seed
            spans.append((len(tokens), len(tokens) + n))
            tokens += list(range(first, first + n)) + fixed[i + 1]
        return PromptLayout.of(tokens, spans)

    for seed in range(anchors):
        layout = prompt(seed)
        for j, (start, end) in enumerate(layout.spans):  # bases, as an earlier decode's
            engine.observe_output(layout.content(j), kv(end - start, dtype), start)
        measured = kv(len(layout.tokens), dtype)
        engine.observe_prefill(layout, lambda a, b, m=measured: m.tokens(slice(a, b)))
    new = prompt(anchors + 1)
    for j, (start, end) in enumerate(new.spans):
        engine.observe_output(new.content(j), kv(end - start, dtype), start)
    return engine, new


def sweep_apply(
    token_counts: list[int],
    anchor_counts: list[int],
    names: list[str],
    dtype: torch.dtype,
    bound: float,
) -> list[dict]:
    target = pool(max(token_counts) * 3, dtype)
    rows = []
    for tokens in token_counts:
        slots = torch.randperm(target.k_buffer[0].shape[0], device="cuda")[:tokens]
        for anchors in anchor_counts:
            recipe = content_recipe(tokens, anchors, dtype)
            moved = (anchors + 2) * 2 * LAYERS * tokens * HEADS * DIM * 2  # read base+N, write

            def run(r: Recipe = recipe, s: torch.Tensor = slots) -> None:
                kvcomm_kernels.write_recipe(
                    target.k_buffer, target.v_buffer, r, 4000, s, s[:0], ROPE
                )

            for name in backends(names):
                ms = cuda_ms(run)
                gbs = moved / ms / 1e6
                rows.append(
                    {
                        "tokens": tokens,
                        "anchors": anchors,
                        "backend": name,
                        "ms": ms,
                        "GB/s": gbs,
                        "of copy bw": gbs / bound,
                    }
                )
                print(
                    f"T={tokens:5d} N={anchors:2d} {name:7s} {ms:8.3f} ms {gbs:7.0f} GB/s "
                    f"{gbs / bound:6.1%} of copy",
                    flush=True,
                )
    return rows


def stitch_agent5(
    anchors: int, names: list[str], dtype: torch.dtype, profile: bool = False
) -> list[dict]:
    """Plan + write of the agent-5 prompt per placeholder estimate and backend: the wall time
    (CUDA events around 10 back-to-back stitches) and the host time of one stitch (returned
    as launched, nothing waited for)."""
    kv_pool = PoolKV(pool(8192, dtype))
    stitch = []
    for placeholder in ("token", "index"):
        engine, layout = agent5_engine(dtype, anchors, placeholder)
        end = len(layout.tokens) - 1
        slots = torch.randperm(8192, device="cuda")[: end - layout.spans[0][0]]

        def full(e: KVComm = engine, lay: PromptLayout = layout, s: torch.Tensor = slots) -> Reuse:
            plan = e.plan(lay, lay.spans[0][0], len(lay.tokens) - 1)
            if not isinstance(plan, Reuse):
                raise RuntimeError(f"the agent-5 prompt did not plan a reuse: {plan}")
            kv_pool.write(plan, s[: plan.num_tokens], ROPE)
            return plan

        for name in backends(names):
            plan = full()
            ms_full = cuda_ms(full, repeat=10)
            ms_write = cuda_ms(
                lambda p=plan, s=slots: kv_pool.write(p, s[: p.num_tokens], ROPE), repeat=10
            )
            host = []
            for _ in range(10):
                torch.cuda.synchronize()
                started = time.perf_counter()
                full()
                host.append(1000 * (time.perf_counter() - started))
            torch.cuda.synchronize()
            if profile and name == "triton":  # where the host time of a stitch goes
                import cProfile
                import pstats

                profiler = cProfile.Profile()
                profiler.runcall(lambda: [full() for _ in range(20)])
                torch.cuda.synchronize()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
                import warnings

                with warnings.catch_warnings(record=True) as syncs:  # each host sync, by line
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    full()
                    torch.cuda.set_sync_debug_mode("default")
                for w in syncs:
                    print(f"host sync: {w.filename}:{w.lineno}: {str(w.message)[:80]}")
            row = {
                "placeholder": placeholder,
                "backend": name,
                "prompt tokens": len(layout.tokens),
                "estimated tokens": plan.num_tokens,
                "anchors": anchors,
                "plan+write ms": ms_full,
                "host ms": sorted(host)[len(host) // 2],
                "write ms": ms_write,
            }
            stitch.append(row)
            print(
                f"agent-5 stitch ({row['prompt tokens']} tokens, {plan.num_tokens} estimated, "
                f"{anchors} anchors, {placeholder}) {name}: plan+write {ms_full:.2f} ms, host "
                f"{row['host ms']:.2f} ms, write {ms_write:.2f} ms",
                flush=True,
            )
    return stitch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for results.json")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--anchors", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--agent5-anchors", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["torch", "triton"])
    parser.add_argument("--profile", action="store_true", help="cProfile agent-5 stitches")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA device", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    bound = copy_bandwidth(dtype)
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bound:.0f} GB/s", flush=True)
    rows = sweep_apply(args.tokens, args.anchors, args.backends, dtype, bound)
    stitch = stitch_agent5(args.agent5_anchors, args.backends, dtype, args.profile)
    result = {
        "device": torch.cuda.get_device_name(),
        "copy GB/s": bound,
        "apply": rows,
        "agent5": stitch,
        "torch": torch.__version__,
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "kernel_bench.json").write_text(json.dumps(result, indent=1))
    print("\ntokens  anchors  backend     ms   GB/s  of copy bw")
    for r in rows:
        print(
            f"{r['tokens']:6d}  {r['anchors']:7d}  {r['backend']:7s} {r['ms']:6.3f} "
            f"{r['GB/s']:6.0f}  {r['of copy bw']:9.1%}"
        )
    print("\nagent-5 stitch  placeholder  backend  plan+write ms  host ms  write ms")
    for r in stitch:
        print(
            f"{'':15s} {r['placeholder']:11s}  {r['backend']:7s}  {r['plan+write ms']:13.2f}  "
            f"{r['host ms']:7.2f}  {r['write ms']:8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dense reference computations with Hugging Face transformers: KV of a prompt at any positions,
next-token logits and greedy continuations from a given (possibly stitched) KV cache.

KV tensors use radix_anchor's layout, ``[layers, tokens, kv_heads, head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from radix_anchor.anchor_pool import KV
from radix_anchor.rope import RopeSpec


def concat(*parts: KV) -> KV:
    return KV(torch.cat([p.k for p in parts], dim=1), torch.cat([p.v for p in parts], dim=1))


@dataclass
class Prefill:
    kv: KV  # of the new tokens
    logits: torch.Tensor  # [T, vocab], float32


class HFModel:
    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.config = self.model.config
        self.rope = RopeSpec.from_hf_config(self.config)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @torch.no_grad()
    def prefill(self, ids: list[int], start: int = 0, past: KV | None = None) -> Prefill:
        """Run ``ids`` at positions ``start ..`` behind ``past`` (the KV of positions 0 .. start-1;
        without it the tokens attend only to each other)."""
        if past is not None and past.num_tokens != start:
            raise ValueError(f"past holds {past.num_tokens} tokens but start is {start}")
        cache = self._cache(past)
        positions = torch.arange(start, start + len(ids))[None]
        out = self.model(
            input_ids=torch.tensor([ids]),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        new = slice(_len(past), None)
        k = torch.stack([layer.keys[0, :, new] for layer in cache.layers])
        v = torch.stack([layer.values[0, :, new] for layer in cache.layers])
        # cache layers hold [B, H, T, D]; radix_anchor wants [L, T, H, D]
        kv = KV(k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
        return Prefill(kv, out.logits[0].float())

    @torch.no_grad()
    def greedy(self, past: KV, last_token: int, steps: int) -> tuple[torch.Tensor, list[int]]:
        """Feed ``last_token`` behind ``past``; returns the first next-token log-probabilities
        and ``steps`` greedy tokens."""
        cache = self._cache(past)
        position = past.num_tokens
        token = last_token
        first_logprobs = None
        out_tokens = []
        for _ in range(steps):
            out = self.model(
                input_ids=torch.tensor([[token]]),
                position_ids=torch.tensor([[position]]),
                past_key_values=cache,
                use_cache=True,
            )
            logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            if first_logprobs is None:
                first_logprobs = logprobs
            token = int(logprobs.argmax())
            out_tokens.append(token)
            position += 1
        return first_logprobs, out_tokens

    def _cache(self, past: KV | None) -> DynamicCache:
        cache = DynamicCache(config=self.config)
        if past is not None:
            for layer in range(past.k.shape[0]):
                cache.update(
                    past.k[layer].transpose(0, 1)[None].contiguous(),
                    past.v[layer].transpose(0, 1)[None].contiguous(),
                    layer,
                )
        return cache


def _len(past: KV | None) -> int:
    return 0 if past is None else past.num_tokens

"""A minimal timing client for probes that send raw token ids to a running SGLang server."""

from __future__ import annotations

import random
import time

import requests


class TokenClient:
    def __init__(self, url: str, seed: int, vocab: int = 100_000) -> None:
        self.url = url
        self.vocab = vocab
        self.rng = random.Random(seed)
        self.session = requests.Session()

    def ids(self, n: int) -> list[int]:
        """n random token ids (distinct prompts never share a cached prefix by chance)."""
        return [self.rng.randrange(1000, self.vocab) for _ in range(n)]

    def first_token(
        self, tokens: list[int], custom_params: dict | None = None
    ) -> tuple[float, dict]:
        """Client-side TTFT (ms) of ``tokens`` with one output token, and the meta info."""
        sampling = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
        if custom_params:
            sampling["custom_params"] = custom_params
        t0 = time.perf_counter()
        body = {"input_ids": tokens, "sampling_params": sampling}
        res = self.session.post(self.url + "/generate", json=body, timeout=300)
        res.raise_for_status()
        return 1000 * (time.perf_counter() - t0), res.json()["meta_info"]

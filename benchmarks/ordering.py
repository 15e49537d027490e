"""Is the estimate written before the forward that reads it? The same reused prompt on an idle
``--kvcomm`` server and under concurrent decode load must give bit-identical logprobs.

With SGLang's overlap scheduler the scheduler plans batch N+1 (our ``match_prefix``, which writes
the estimated KV into the pool) while the GPU still runs batch N. If that write were not ordered
before the forward of the batch that reads it, the prefill would read stale slots, and it would
show most under load, when the GPU is busy and the write is queued behind decode steps.

1. Teach (random token ids, any model, dummy weights too): agent B reads the shared content Q
   (its KV becomes Q's base), agent A reads other contents (anchors of A's pool).
2. The target, agent A reading Q, is a reuse: sent ``--repeats`` times on the idle server.
3. ``--load`` streamed requests decode ``--load-tokens`` tokens each (EOS ignored); while they
   run, the target is sent ``--repeats`` times again.

Compared: the first output token's logprob and its top-k logprobs (computed by the prefill that
reads the estimate; must be bit-identical), and the later tokens' logprobs (decoded in batches of
different sizes, reported, not required). Prints a table; writes ``ordering.json`` to ``--out``.

    python benchmarks/ordering.py --url http://127.0.0.1:30001 --vocab 128000   # a GPU server
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path

import requests
from report import format_table

from sglang_kvcomm.protocol import report_from_meta


def _body(tokens: list[int], spans: list[int] | None, max_new: int, logprobs: int) -> dict:
    sampling = {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}
    if spans is not None:
        sampling["custom_params"] = {"kvcomm_mode": "approx", "kvcomm_spans": spans}
    body = {"input_ids": tokens, "sampling_params": sampling}
    if logprobs:
        body |= {"return_logprob": True, "top_logprobs_num": logprobs}
    return body


def _post(url: str, body: dict) -> dict:
    res = requests.post(url + "/generate", json=body, timeout=600)
    res.raise_for_status()
    return res.json()


class Load:
    """``n`` streamed decodes kept running in threads until ``stop``."""

    def __init__(self, url: str, prompts: list[list[int]], tokens: int) -> None:
        self.url, self.tokens = url, tokens
        self.started = threading.Barrier(len(prompts) + 1)
        self.done = threading.Event()
        self.chunks = 0
        self.threads = [threading.Thread(target=self._run, args=(p,)) for p in prompts]

    def _run(self, prompt: list[int]) -> None:
        body = _body(prompt, None, self.tokens, 0) | {"stream": True}
        with requests.post(self.url + "/generate", json=body, stream=True, timeout=600) as res:
            first = True
            for line in res.iter_lines():
                if line.startswith(b"data:"):
                    self.chunks += 1
                    if first:
                        first = False
                        self.started.wait()
                if self.done.is_set():
                    return  # closing the connection aborts the request

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        self.started.wait(timeout=600)  # every load request is decoding
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for t in self.threads:
            t.join(timeout=120)


def _logprobs(out: dict) -> tuple[list[float], list[list[tuple[float, int]]]]:
    meta = out["meta_info"]
    values = [lp for lp, _, _ in meta["output_token_logprobs"]]
    top = [[(lp, tok) for lp, tok, _ in step] for step in meta["output_top_logprobs"]]
    return values, top


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(1000, args.vocab) for _ in range(n)]

    prefix_a, prefix_b, suffix = ids(args.prefix), ids(args.prefix), ids(8)
    shared = ids(args.shared)

    def prompt(prefix: list[int], content: list[int]) -> tuple[list[int], list[int]]:
        return prefix + content + suffix, [len(prefix), len(prefix) + len(content)]

    url = args.url
    assert requests.post(url + "/flush_cache", timeout=60).ok
    _post(url, _body(*prompt(prefix_b, shared), 2, 0))  # Q's base KV
    for _ in range(args.anchors):  # A's anchors
        _post(url, _body(*prompt(prefix_a, ids(args.shared)), 2, 0))
    target = _body(*prompt(prefix_a, shared), args.max_new, args.top)

    def send(phase: str, n: int) -> list[dict]:
        outs = []
        for _ in range(n):
            out = _post(url, target)
            report = report_from_meta(out["meta_info"])
            values, top = _logprobs(out)
            outs.append(
                {
                    "phase": phase,
                    "report": report,
                    "logprobs": values,
                    "top": top,
                    "output_ids": out["output_ids"],
                }
            )
            time.sleep(args.gap_s)
        return outs

    idle = send("idle", args.repeats)
    load_prompts = [ids(args.load_prompt) for _ in range(args.load)]
    with Load(url, load_prompts, args.load_tokens) as load:
        chunks_before = load.chunks
        loaded = send("load", args.repeats)
        chunks_during = load.chunks - chunks_before

    reference = idle[0]
    rows, same_first, same_all = [], 0, 0
    for sample in idle + loaded:
        first = (sample["logprobs"][0], sample["top"][0]) == (
            reference["logprobs"][0],
            reference["top"][0],
        )
        whole = sample["logprobs"] == reference["logprobs"] and sample["top"] == reference["top"]
        diff = max(
            abs(a - b) for a, b in zip(sample["logprobs"], reference["logprobs"], strict=True)
        )
        same_first += first
        same_all += whole
        rows.append(
            [
                sample["phase"],
                sample["report"].get("decision", "?"),
                sample["report"].get("tokens_estimated", 0),
                "yes" if first else "NO",
                "yes" if whole else "no",
                f"{diff:.3g}",
                "yes" if sample["output_ids"] == reference["output_ids"] else "no",
            ]
        )
    reused = sum(s["report"].get("decision") == "reuse" for s in idle + loaded)
    return {
        "args": vars(args),
        "samples": idle + loaded,
        "rows": rows,
        "reused": reused,
        "first_token_identical": same_first,
        "all_tokens_identical": same_all,
        "total": len(idle) + len(loaded),
        "load_chunks_during_target": chunks_during,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="a running --kvcomm server")
    parser.add_argument("--vocab", type=int, default=49_000, help="token ids are drawn below it")
    parser.add_argument("--prefix", type=int, default=256, help="agent prefix tokens")
    parser.add_argument("--shared", type=int, default=2048, help="shared content tokens")
    parser.add_argument("--anchors", type=int, default=3, help="dense prompts teaching A's pool")
    parser.add_argument("--max-new", type=int, default=8, help="target output tokens")
    parser.add_argument("--top", type=int, default=5, help="top-k logprobs compared")
    parser.add_argument("--repeats", type=int, default=5, help="targets per phase")
    parser.add_argument("--gap-s", type=float, default=0.05, help="pause between targets")
    parser.add_argument("--load", type=int, default=32, help="concurrent decoding requests")
    parser.add_argument("--load-prompt", type=int, default=512, help="their prompt tokens")
    parser.add_argument("--load-tokens", type=int, default=4000, help="their decode length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/ordering"))
    args = parser.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ordering.json").write_text(json.dumps(result, indent=1, default=str))
    header = [
        "phase",
        "decision",
        "estimated",
        "1st token =",
        "all tokens =",
        "max |dlogp|",
        "same ids",
    ]
    print(format_table(header, result["rows"]))
    print(
        f"reused {result['reused']}/{result['total']}; first-token logprobs bit-identical to "
        f"idle: {result['first_token_identical']}/{result['total']}; all tokens: "
        f"{result['all_tokens_identical']}/{result['total']}; load streamed "
        f"{result['load_chunks_during_target']} chunks while the targets ran"
    )
    ok = result["reused"] == result["total"] == result["first_token_identical"]
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

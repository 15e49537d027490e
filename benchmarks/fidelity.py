"""Fidelity harness on the server's policy: how close are reused calls to dense prefill?

The project's fully connected program on GSM8K questions, computed with transformers (fp32):
agent i's prompt is its system prompt, the question, the answers of agents 1 .. i-1, and a fixed
lead-in to its own answer (ChatML). The server's core (``radix_anchor.reuse.KVComm``) serves it:
agent 1's dense prefill gives the question its base KV (a sibling agent's context, as on the
server), each answer's decode gives the answer its base, dense calls teach the pools, and every
span after an agent's system prompt is estimated. The program always continues on the dense
answers, so every variant sees the same stream.

For every call of a warmed-up pool (at least one anchor per span) each variant's KV is scored
against the dense prefill: teacher-forced along the dense greedy response (``--response``
tokens), the per-token KL(dense || variant) and top-1 agreement (mean, p95 of KL), the KL of
the first answer token, and free-running greedy agreement over ``--free`` tokens (exact = all
equal). Variants, in one run:

- ``server``: the defaults (token-matched offsets, the final segment prefilled exactly);
- ``token offsets, estimated final`` and ``paper (index weights, estimated final)``: ablations;
- ``rotation only`` / ``naive reuse``: each content's base KV rotated to its new place (or left
  where it was computed), every fixed segment prefilled behind it;
- ``selective recompute 15%``: rotation only, plus the 15% of content tokens whose layer-1 KV
  deviates most given their dense KV (CacheBlend's selection; an upper bound on CacheBlend,
  which recomputes those tokens over approximate context).

``--base neutral`` gives each question its base from one prefill behind ``<|im_start|>user\\n``
instead (the paper's setting; agent 1 can then reuse too); ``--base canonical`` behind the
frontend's canonical reader (an agent-like system prompt and the agents' header), as
``fully_connected(base=CANONICAL_READER)`` does on the server. Three gate statistics are logged
for every scored call (``GATE_STATISTICS``) with the call's KL: their AUCs say how well each
ranks calls by error.

    python benchmarks/fidelity.py --model qwen2.5-coder-0.5b --questions 24
    python benchmarks/fidelity.py --model smollm2 --questions 24 --base neutral
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hf_kv import HFModel, concat
from report import format_table

from radix_anchor.anchor_pool import KV
from radix_anchor.estimate import EstimateOptions
from radix_anchor.gate import decide, decide_by_error
from radix_anchor.prompt import PromptLayout
from radix_anchor.reuse import KVComm, Reuse, ReuseConfig
from radix_anchor.rope import rotate
from radix_anchor.token_index import TokenIndex
from sglang_kvcomm.assets.datasets import gsm8k
from sglang_kvcomm.assets.models import model_dir

ROLES = (
    "You are a careful math solver. Solve problems step by step.",
    "You are a mathematical analyst who checks every claim and computes results exactly.",
    "You are an inspector who verifies arithmetic and points out mistakes.",
    "You are a teacher who explains the key idea of a problem in one or two sentences.",
    "You are a skeptical reviewer who looks for the weakest step in an argument.",
)
HEADER = "<|im_start|>user\nSolve this problem:\n"
BEFORE_ANSWER = "\n\nAgent {} answered:\n"
SUFFIX = "\n\nGive your answer step by step.<|im_end|>\n<|im_start|>assistant\n"
BASE_CONTEXTS = {  # --base: the text a question's base KV is computed behind (sibling: agent 1)
    "neutral": "<|im_start|>user\n",
    # the frontend's CANONICAL_READER (kvcomm_frontend.agents) in this harness's ChatML
    "canonical": "<|im_start|>system\nYou are a helpful assistant. Read the problem; others will "
    "solve it.<|im_end|>\n" + HEADER,
}
SERVER = "server"
ESTIMATED = {  # variants the engine plans
    SERVER: ReuseConfig(threshold=1.0),
    "token offsets, estimated final": ReuseConfig(threshold=1.0, exact_final=0),
    "paper (index weights, estimated final)": ReuseConfig(
        threshold=1.0, exact_final=0, estimate=EstimateOptions(placeholder="index")
    ),
}
PIECEWISE = ("rotation only", "naive reuse", "selective recompute 15%")
GATE_STATISTICS = ("predicted error", "unmatched share", "entropy / limit")
FREE_RUNNING = (SERVER, "paper (index weights, estimated final)", "rotation only")


@dataclass
class Call:
    """One agent's prompt: tokens with the spans of shared contents, where each content's base
    was computed (for naive reuse), and the dense reference."""

    agent: int
    layout: PromptLayout
    base_at: list[int]
    dense: KV | None = None
    response: list[int] = field(default_factory=list)  # dense greedy continuation
    logprobs: torch.Tensor | None = None  # dense, teacher-forced: [len(response), vocab]


@dataclass
class Score:
    kl: list[float]  # per teacher-forced position
    top1: list[bool]
    free_agree: float | None = None
    free_exact: bool | None = None


class Harness:
    def __init__(
        self, model: HFModel, agents: int, response: int, free: int, base: str = "sibling"
    ) -> None:
        self.m = model
        self.agents = agents
        self.response_len = response
        self.free = free
        self.base = base
        # the tokens a question's base is computed behind (None: agent 1's prompt)
        self.base_context = None if base == "sibling" else model.encode(BASE_CONTEXTS[base])
        self.engine = KVComm(model.rope)  # the server's: gate at its default threshold
        self.planners = {name: self._sharing(cfg) for name, cfg in ESTIMATED.items()}
        self.prefixes = [
            model.encode(f"<|im_start|>system\n{role}<|im_end|>\n") + model.encode(HEADER)
            for role in ROLES[:agents]
        ]
        self.suffix = model.encode(SUFFIX)
        self.eos = model.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _sharing(self, config: ReuseConfig) -> KVComm:
        """A planner over the server engine's bases and pools with other options."""
        planner = KVComm(self.m.rope, config)
        planner.bases, planner.anchors = self.engine.bases, self.engine.anchors
        return planner

    # -- the program ------------------------------------------------------------------------

    def question(self, text: str) -> tuple[list[Call], list[dict]]:
        """Run the program on one question; returns its calls and one record per call."""
        q = self.m.encode(text)
        context = self.base_context
        if context is not None:
            kv = self.m.prefill(context + q).kv.tokens(slice(len(context), None))
            base = KV(rotate(kv.k, -len(context), self.m.rope), kv.v.clone())
            self.engine.bases.put(tuple(q), base, origin=(self.base,))
        answers: list[tuple[list[int], int]] = []  # (ids, position where its base was made)
        calls, records = [], []
        for a in range(self.agents):
            call = self._call(a, q, answers)
            self._dense(call)
            records.append(self._serve(call))
            calls.append(call)
            answer = call.response[: self.response_len]
            answer = answer[: answer.index(self.eos)] if self.eos in answer else answer
            prompt = list(call.layout.tokens)
            kv = self.m.prefill(prompt + answer).kv.tokens(slice(len(prompt), None))
            self.engine.observe_output(tuple(answer), kv, len(prompt), call.layout)
            answers.append((answer, len(prompt)))
        return calls, records

    def _call(self, a: int, q: list[int], answers: list[tuple[list[int], int]]) -> Call:
        tokens = list(self.prefixes[a])
        spans, base_at = [], []
        q_at = len(self.prefixes[0] if self.base_context is None else self.base_context)
        for j, (ids, at) in enumerate([(q, q_at), *answers]):
            if j:
                tokens += self.m.encode(BEFORE_ANSWER.format(j))
            spans.append((len(tokens), len(tokens) + len(ids)))
            base_at.append(at)
            tokens += ids
        tokens += self.suffix
        return Call(a, PromptLayout.of(tokens, spans), base_at)

    def _dense(self, call: Call) -> None:
        prompt = list(call.layout.tokens)
        past = self.m.prefill(prompt[:-1]).kv
        _, call.response = self.m.greedy(past, prompt[-1], self.response_len)
        out = self.m.prefill(prompt + call.response)
        call.dense = out.kv.tokens(slice(0, len(prompt)))
        call.logprobs = torch.log_softmax(out.logits[len(prompt) - 1 : -1], dim=-1)

    def _serve(self, call: Call) -> dict:
        """The server's decision on the call, every variant's score where the pools are warm,
        and the server's learning (a dense call teaches)."""
        layout, exact = call.layout, call.layout.spans[0][0]
        end = len(layout.tokens) - 1
        decision = self.engine.plan(layout, exact, end)
        record = {
            "agent": call.agent,
            "decision": "reuse" if isinstance(decision, Reuse) else decision.reason,
            "scores": {},
        }
        plans = {name: p.plan(layout, exact, end) for name, p in self.planners.items()}
        if isinstance(plans[SERVER], Reuse):  # the pools are warm: score what can be planned
            record["gate"] = self._gate(layout)
            for name, plan in plans.items():
                if isinstance(plan, Reuse):
                    head = call.dense.tokens(slice(0, plan.start))
                    stitched = concat(head, plan.materialize(self.m.rope))
                    record["scores"][name] = self._score(call, stitched, name)
            for name in PIECEWISE:
                record["scores"][name] = self._score(call, self._piecewise(call, name), name)
        if isinstance(decision, Reuse):
            self.engine.commit(decision)
        else:
            self.engine.observe_prefill(layout, lambda s, e: call.dense.tokens(slice(s, e)))
        return record

    def _gate(self, layout: PromptLayout) -> dict:
        """Gate statistics of the call, each the largest over its spans: the server's predicted
        relative error, the share of content tokens without a same-id match, and the paper's
        entropy over its limit (0 where fewer than two anchors cover the content)."""
        stats: dict[str, list[float]] = {name: [] for name in GATE_STATISTICS}
        for j in range(len(layout.spans)):
            content = layout.content(j)
            pool = list(self.engine.anchors.get(self.engine.pool_key(layout, j)) or ())
            stats["predicted error"].append(decide_by_error(content, pool, 1.0).statistic)
            matched = TokenIndex(pool).matched(content).mean() if pool else 0.0
            stats["unmatched share"].append(1 - float(matched))
            paper = decide(self.engine.bases.get(content).v, pool, 1.0)
            ratio = paper.statistic / paper.limit if paper.limit else 0.0
            stats["entropy / limit"].append(0.0 if math.isnan(ratio) else ratio)
        return {name: max(values) for name, values in stats.items()}

    # -- variants ---------------------------------------------------------------------------

    def _piecewise(self, call: Call, name: str) -> KV:
        """Contents from their bases (rotated, or not), fixed segments prefilled behind them;
        selective recompute puts back the dense KV of the most deviating content tokens."""
        layout, rope = call.layout, self.m.rope
        kv = call.dense.tokens(slice(0, layout.spans[0][0]))
        for j, (start, end) in enumerate(layout.spans):
            base = self.engine.bases.get(layout.content(j))
            at = call.base_at[j] if name == "naive reuse" else start
            content = KV(rotate(base.k, at, rope), base.v)
            if name == "selective recompute 15%":
                content = _recompute(content, call.dense.tokens(slice(start, end)), 0.15)
            kv = concat(kv, content)
            following = list(layout.tokens[end : layout.following_end(j)])
            if j + 1 == len(layout.spans):
                following = following[:-1]  # the last prompt token is fed by _score
            if following:
                kv = concat(kv, self.m.prefill(following, kv.num_tokens, kv).kv)
        return kv

    def _score(self, call: Call, stitched: KV, name: str) -> Score:
        """Teacher-forced along the dense response, and free-running for some variants."""
        prompt = list(call.layout.tokens)
        rest = prompt[stitched.num_tokens :]
        out = self.m.prefill(rest + call.response, stitched.num_tokens, stitched)
        logprobs = torch.log_softmax(out.logits[len(rest) - 1 : -1], dim=-1)
        dense = call.logprobs
        kl = (dense.exp() * (dense - logprobs)).sum(-1)
        top1 = logprobs.argmax(-1) == dense.argmax(-1)
        score = Score([float(x) for x in kl], [bool(x) for x in top1])
        if name in FREE_RUNNING and self.free:
            past = stitched
            if len(rest) > 1:
                past = concat(past, self.m.prefill(rest[:-1], past.num_tokens, past).kv)
            _, free = self.m.greedy(past, prompt[-1], self.free)
            same = [x == y for x, y in zip(free, call.response[: self.free], strict=True)]
            score.free_agree, score.free_exact = sum(same) / len(same), all(same)
        return score


def _recompute(content: KV, dense: KV, share: float) -> KV:
    """``content`` with the dense KV of the ``share`` of its tokens that deviate most at
    layer 1 (the first layer that depends on context)."""
    deviation = (content.k[1] - dense.k[1]).norm(dim=(1, 2)) + (content.v[1] - dense.v[1]).norm(
        dim=(1, 2)
    )
    chosen = deviation.topk(max(1, round(share * content.num_tokens))).indices
    k, v = content.k.clone(), content.v.clone()
    k[:, chosen], v[:, chosen] = dense.k[:, chosen], dense.v[:, chosen]
    return KV(k, v)


# -- summaries ------------------------------------------------------------------------------


def summarize(records: list[dict]) -> dict:
    """Reuse counts, and each variant's scores over the calls it could plan; ``paired``: over
    the calls every variant could plan (the paper's estimate needs two anchors as long as
    each content)."""
    calls = len(records)
    reused = sum(r["decision"] == "reuse" for r in records)
    scored = [r for r in records if r["scores"]]
    paired = [r for r in scored if len(r["scores"]) == len(ESTIMATED) + len(PIECEWISE)]
    reasons: dict[str, int] = {}
    for r in records:
        reasons[r["decision"]] = reasons.get(r["decision"], 0) + 1
    return {
        "calls": calls,
        "reused": reused,
        "reuse_rate": reused / calls if calls else 0.0,
        "decisions": reasons,
        "variants": _variants(scored),
        "paired": _variants(paired),
        "gate_auc": gate_auc(scored),
    }


def _variants(scored: list[dict]) -> dict:
    variants = {}
    for name in (*ESTIMATED, *PIECEWISE):
        scores = [r["scores"][name] for r in scored if name in r["scores"]]
        if not scores:
            continue
        kl = torch.tensor([x for s in scores for x in s.kl])
        free = [s for s in scores if s.free_agree is not None]
        variants[name] = {
            "calls": len(scores),
            "kl_mean": float(kl.mean()),
            "kl_p95": float(kl.quantile(0.95)),
            "first_token_kl": sum(s.kl[0] for s in scores) / len(scores),
            "top1": sum(sum(s.top1) for s in scores) / sum(len(s.top1) for s in scores),
            "free_agree": sum(s.free_agree for s in free) / len(free) if free else None,
            "free_exact": sum(s.free_exact for s in free) / len(free) if free else None,
        }
    return variants


def gate_auc(scored: list[dict]) -> dict | None:
    """How well each gate statistic ranks scored calls by the server variant's mean KL: the AUC
    of the statistic for telling calls above the median KL from those below (0.5: no signal;
    1: a larger statistic always means more error)."""
    kls = [sum(r["scores"][SERVER].kl) / len(r["scores"][SERVER].kl) for r in scored]
    if len(kls) < 4:
        return None
    median = sorted(kls)[len(kls) // 2]
    out: dict = {"calls": len(kls), "median_kl": median}
    for name in GATE_STATISTICS:
        high = [r["gate"][name] for r, kl in zip(scored, kls, strict=True) if kl >= median]
        low = [r["gate"][name] for r, kl in zip(scored, kls, strict=True) if kl < median]
        wins = sum((h > lo) + 0.5 * (h == lo) for h in high for lo in low)
        out[name] = wins / (len(high) * len(low))
    return out


def table(variants: dict) -> str:
    rows = [
        [
            name,
            v["calls"],
            v["kl_mean"],
            v["kl_p95"],
            v["first_token_kl"],
            v["top1"],
            "-" if v["free_agree"] is None else v["free_agree"],
            "-" if v["free_exact"] is None else v["free_exact"],
        ]
        for name, v in variants.items()
    ]
    headers = ["variant", "calls", "KL mean", "KL p95", "KL 1st", "top-1", "free agree", "exact"]
    return format_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--model", default="smollm2", help="packaged model: smollm2 or qwen2.5-coder-0.5b"
    )
    parser.add_argument("--agents", type=int, default=3, help="agents per question (<= 5)")
    parser.add_argument("--questions", type=int, default=24, help="GSM8K questions")
    parser.add_argument(
        "--response", type=int, default=64, help="dense response tokens (teacher forcing)"
    )
    parser.add_argument("--free", type=int, default=32, help="free-running tokens compared")
    parser.add_argument("--base", choices=["sibling", *BASE_CONTEXTS], default="sibling")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    model = HFModel(model_dir(args.model), threads=args.threads)
    h = Harness(model, args.agents, args.response, args.free, args.base)
    records = []
    for i, problem in enumerate(gsm8k(limit=args.questions)):
        records += h.question(problem.question)[1]
        print(
            f"[fidelity] question {i + 1}/{args.questions} ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    summary = summarize(records)
    summary |= {"model": args.model, "base": args.base, "args": vars(args) | {"out": str(args.out)}}
    print(
        f"\n{args.model}, {args.base} bases: reuse {summary['reused']}/{summary['calls']} "
        f"({summary['reuse_rate']:.2f}); decisions {summary['decisions']}; "
        f"gate AUC {summary['gate_auc']}"
    )
    print("every call each variant could plan:")
    print(table(summary["variants"]))
    print("paired (calls every variant could plan):")
    print(table(summary["paired"]))
    if args.out:
        summary["records"] = [
            {
                "agent": r["agent"],
                "decision": r["decision"],
                **r.get("gate", {}),
                **{f"kl_mean {n}": sum(s.kl) / len(s.kl) for n, s in r["scores"].items()},
            }
            for r in records
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

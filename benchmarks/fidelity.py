"""Fidelity harness: how close is KVCOMM's estimated KV to a dense prefill, on real models?

M agent templates (distinct system prompts and roles) read a stream of shared contents (GSM8K
questions right after the agent's prefix, and answers the model itself generates, shown after
their question so that their position varies). Pools, one per (agent, slot), learn online as the
server would: a call whose content the gate does not find shareable is prefilled densely and
becomes an anchor. For every (agent, content) pair whose pool has at least two covering anchors,
the prompt's KV after the agent prefix is estimated with each variant and compared with a dense
prefill of the same prompt: per-layer relative KV error over the estimated span, KL divergence of
the next-token distribution at the last prompt position, and greedy agreement over the next
tokens. A second pass per gamma reports the reuse rate and the fidelity of the reused calls.

    python benchmarks/fidelity.py --model smollm2 --contents 16
    python benchmarks/fidelity.py --model qwen2.5-coder-0.5b --contents 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hf_kv import HFModel, concat
from report import format_table

from radix_anchor.anchor_pool import KV, Anchor, AnchorStore
from radix_anchor.estimate import EstimateOptions, estimate
from radix_anchor.gate import activate, decide
from radix_anchor.rope import rotate
from sglang_kvcomm.assets.datasets import gsm8k
from sglang_kvcomm.assets.models import model_dir

ROLES = (
    "You are a careful math solver. Solve problems step by step.",
    "You are a mathematical analyst who checks every claim and computes results exactly.",
    "You are an inspector who verifies arithmetic and points out mistakes.",
    "You are a teacher who explains the key idea of a problem in one or two sentences.",
    "You are a skeptical reviewer who looks for the weakest step in an argument.",
)
NEUTRAL = "<|im_start|>user\n"  # the short context a shared content's base KV is computed behind
BEFORE_ANSWER = "\n\nAnother agent answered:\n"  # between a question and an agent's answer
SUFFIX = "\n\nWhat is the answer? Reply briefly.<|im_end|>\n<|im_start|>assistant\n"

VARIANTS = {
    "naive reuse (no rotation)": None,  # base and template KV as computed, wrong positions
    "rotation only": EstimateOptions(placeholder_offset=False, following_offset=False),
    "rotation + placeholder offset": EstimateOptions(following_offset=False),
    # diagnostic: the same offsets blended with equal weights (tau -> infinity)
    "rotation + placeholder offset, uniform weights": EstimateOptions(
        following_offset=False, tau=1e12
    ),
    "rotation + following offset": EstimateOptions(placeholder_offset=False),
    "full (ours)": EstimateOptions(),
    "full (authors' code)": EstimateOptions(authors_code=True),
}
FULL = "full (ours)"


@dataclass
class Content:
    kind: str  # "question" | "response": also the slot, so each has its own pools
    ids: list[int]
    base: KV  # position-0 frame
    base_at: int  # position of its first token where the base KV was computed (naive reuse)
    context: list[int] = field(default_factory=list)  # exact tokens between prefix and content


@dataclass
class Agent:
    name: str
    prefix_ids: list[int]
    template: KV  # the suffix computed right behind the prefix (no content), position-0 frame


@dataclass
class Reference:
    """Dense prefill of one (agent, content) prompt."""

    kv: KV
    logprobs: torch.Tensor
    greedy: list[int]


@dataclass
class Scores:
    kv_error: list[float] = field(default_factory=list)  # per layer, mean of K and V
    kl: float = 0.0
    agreement: float = 0.0  # share of greedy tokens equal to the dense ones, position-wise
    exact: bool = False  # all greedy tokens equal


class Harness:
    def __init__(self, model: HFModel, agents: int, decode: int) -> None:
        self.m = model
        self.decode = decode
        self.suffix = model.encode(SUFFIX)
        self.neutral = model.encode(NEUTRAL)
        self.before_answer = model.encode(BEFORE_ANSWER)
        self.agents = [self._agent(f"agent{i}", role) for i, role in enumerate(ROLES[:agents])]
        self._refs: dict[tuple[int, int], Reference] = {}

    def _agent(self, name: str, role: str) -> Agent:
        prefix = self.m.encode(
            f"<|im_start|>system\n{role}<|im_end|>\n<|im_start|>user\n"
            "Read this and answer the question it asks.\n\n"
        )
        kv = self.m.prefill(prefix + self.suffix).kv.tokens(slice(len(prefix), None))
        return Agent(name, prefix, KV(rotate(kv.k, -len(prefix), self.m.rope), kv.v))

    def question(self, text: str) -> Content:
        ids = self.m.encode(text)
        kv = self.m.prefill(self.neutral + ids).kv.tokens(slice(len(self.neutral), None))
        n = len(self.neutral)
        return Content("question", ids, KV(rotate(kv.k, -n, self.m.rope), kv.v), n)

    def response(self, agent: Agent, question: Content, max_tokens: int) -> Content:
        """An answer the model generates; its base KV is the KV of its own decode context."""
        prompt = agent.prefix_ids + question.ids + self.suffix
        past = self.m.prefill(prompt[:-1]).kv
        _, tokens = self.m.greedy(past, prompt[-1], max_tokens)
        eos = self.m.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids = tokens[: tokens.index(eos)] if eos in tokens else tokens
        kv = self.m.prefill(prompt + ids).kv.tokens(slice(len(prompt), None))
        base = KV(rotate(kv.k, -len(prompt), self.m.rope), kv.v)
        # other agents read it after the question: its position varies with the question's length
        return Content("response", ids, base, len(prompt), question.ids + self.before_answer)

    def reference(self, a: int, c: int, content: Content) -> Reference:
        key = (a, c)
        if key not in self._refs:
            prompt = self.agents[a].prefix_ids + content.context + content.ids + self.suffix
            dense = self.m.prefill(prompt)
            past = dense.kv.tokens(slice(0, len(prompt) - 1))
            logprobs, greedy = self.m.greedy(past, prompt[-1], self.decode)
            self._refs[key] = Reference(dense.kv, logprobs, greedy)
        return self._refs[key]

    def anchor(self, agent: Agent, content: Content, ref: Reference) -> Anchor:
        start = self.start(agent, content)
        end = start + len(content.ids)
        return Anchor.from_dense(
            content.base,
            ref.kv.tokens(slice(start, end)),
            ref.kv.tokens(slice(end, None)),
            tuple(self.suffix),
            start,
            self.m.rope,
        )

    def stitch(
        self, variant: str, agent: Agent, content: Content, anchors: list[Anchor], ref: Reference
    ) -> KV:
        """The KV of the prompt minus its last token: exact prefix + estimated rest."""
        start = self.start(agent, content)
        options = VARIANTS[variant]
        if options is None:  # reuse the stored KV where it was computed
            content_kv = KV(rotate(content.base.k, content.base_at, self.m.rope), content.base.v)
            following = KV(rotate(agent.template.k, start, self.m.rope), agent.template.v)
        else:
            est = estimate(
                content.base,
                start,
                anchors,
                self.suffix,
                self.m.rope,
                options,
                following_base=agent.template,
            )
            content_kv, following = est.content, est.following
        prefix = ref.kv.tokens(slice(0, start))
        return concat(prefix, content_kv, following.tokens(slice(0, len(self.suffix) - 1)))

    @staticmethod
    def start(agent: Agent, content: Content) -> int:
        """Position of the content's first token in the agent's prompt."""
        return len(agent.prefix_ids) + len(content.context)

    def score(self, stitched: KV, ref: Reference, start: int) -> Scores:
        span = slice(start, stitched.num_tokens)
        est, dense = stitched.tokens(span), ref.kv.tokens(span)
        errors = [
            0.5
            * float(
                (est.k[layer] - dense.k[layer]).norm() / dense.k[layer].norm()
                + (est.v[layer] - dense.v[layer]).norm() / dense.v[layer].norm()
            )
            for layer in range(dense.k.shape[0])
        ]
        logprobs, greedy = self.m.greedy(stitched, self.suffix[-1], self.decode)
        kl = float((ref.logprobs.exp() * (ref.logprobs - logprobs)).sum())
        same = [a == b for a, b in zip(greedy, ref.greedy, strict=True)]
        return Scores(errors, kl, sum(same) / len(same), all(same))


def build_stream(h: Harness, contents: int, response_tokens: int) -> list[Content]:
    """GSM8K questions, each followed by one agent's generated answer to it."""
    stream = []
    for i, problem in enumerate(gsm8k(limit=(contents + 1) // 2)):
        q = h.question(problem.question)
        stream.append(q)
        if len(stream) < contents:
            stream.append(h.response(h.agents[i % len(h.agents)], q, response_tokens))
    return stream[:contents]


def run_variants(h: Harness, stream: list[Content], gamma: float) -> dict[str, list[Scores]]:
    """Pools learn with the gate at ``gamma``; every variant is scored on every warmed-up pair."""
    store = AnchorStore(capacity=20, window=5)
    scores: dict[str, list[Scores]] = {v: [] for v in VARIANTS}
    for c, content in enumerate(stream):
        for a, agent in enumerate(h.agents):
            ref = h.reference(a, c, content)
            pool = store.pool((agent.name, content.kind))
            decision = decide(content.base.v, list(pool), gamma)
            if len(pool.compatible(len(content.ids))) >= 2:
                for variant in VARIANTS:
                    stitched = h.stitch(variant, agent, content, list(pool), ref)
                    scores[variant].append(h.score(stitched, ref, h.start(agent, content)))
            if decision.shareable:
                activate(decision)
            else:
                pool.add(h.anchor(agent, content, ref))
    return scores


def run_gamma(h: Harness, stream: list[Content], gamma: float) -> dict:
    """Reuse rate (share of all calls the gate lets skip prefill) and the fidelity of those."""
    store = AnchorStore(capacity=20, window=5)
    reused: list[Scores] = []
    calls = 0
    for c, content in enumerate(stream):
        for a, agent in enumerate(h.agents):
            calls += 1
            ref = h.reference(a, c, content)
            pool = store.pool((agent.name, content.kind))
            decision = decide(content.base.v, list(pool), gamma)
            if decision.shareable:
                activate(decision)
                stitched = h.stitch(FULL, agent, content, list(pool), ref)
                reused.append(h.score(stitched, ref, h.start(agent, content)))
            else:
                pool.add(h.anchor(agent, content, ref))
    return {
        "gamma": gamma,
        "calls": calls,
        "reused": len(reused),
        "reuse_rate": len(reused) / calls,
        **summarize(reused),
    }


def summarize(scores: list[Scores]) -> dict:
    if not scores:
        return {"pairs": 0}
    n = len(scores)
    per_layer = torch.tensor([s.kv_error for s in scores]).mean(0)
    return {
        "pairs": n,
        "kv_error_mean": float(per_layer.mean()),
        "kv_error_last_layer": float(per_layer[-1]),
        "kv_error_per_layer": [round(float(x), 5) for x in per_layer],
        "kl_mean": sum(s.kl for s in scores) / n,
        "kl_median": float(torch.tensor([s.kl for s in scores]).median()),
        "agreement": sum(s.agreement for s in scores) / n,
        "exact_match": sum(s.exact for s in scores) / n,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--model",
        default="smollm2",
        choices=["smollm2", "qwen2.5-coder-0.5b"],
        help="packaged model (converted to fp32)",
    )
    parser.add_argument("--agents", type=int, default=3, help="agent templates (<= 5)")
    parser.add_argument(
        "--contents",
        type=int,
        default=16,
        help="shared contents in the stream (questions and generated answers)",
    )
    parser.add_argument(
        "--response-tokens", type=int, default=48, help="length cap of generated answers"
    )
    parser.add_argument("--decode", type=int, default=32, help="greedy tokens compared")
    parser.add_argument("--gamma", type=float, default=0.3, help="gate threshold while learning")
    parser.add_argument(
        "--gammas",
        type=float,
        nargs="*",
        default=[0.1, 0.3, 0.5, 0.9],
        help="thresholds of the reuse-rate sweep",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    h = Harness(HFModel(model_dir(args.model), threads=args.threads), args.agents, args.decode)
    print(f"[fidelity] {args.model}: building a stream of {args.contents} contents", flush=True)
    stream = build_stream(h, args.contents, args.response_tokens)
    print(
        f"[fidelity] contents: {sum(c.kind == 'question' for c in stream)} questions, "
        f"{sum(c.kind == 'response' for c in stream)} responses, "
        f"{sum(len(c.ids) for c in stream) / len(stream):.0f} tokens on average",
        flush=True,
    )
    variants = {v: summarize(s) for v, s in run_variants(h, stream, args.gamma).items()}
    print(f"[fidelity] variants scored ({time.perf_counter() - t0:.0f}s)", flush=True)
    sweep = []
    for gamma in args.gammas:
        sweep.append(run_gamma(h, stream, gamma))
        print(f"[fidelity] gamma {gamma} done ({time.perf_counter() - t0:.0f}s)", flush=True)

    print()
    print(
        f"Variants ({args.model}, {args.agents} agents, {args.contents} contents, "
        f"{variants[FULL]['pairs']} warmed-up pairs, greedy over {args.decode} tokens):"
    )
    print(
        format_table(
            [
                "variant",
                "KV rel err (mean)",
                "KV rel err (last layer)",
                "KL mean",
                "KL median",
                "greedy agree",
                "exact match",
            ],
            [
                [
                    v,
                    s["kv_error_mean"],
                    s["kv_error_last_layer"],
                    s["kl_mean"],
                    s["kl_median"],
                    s["agreement"],
                    s["exact_match"],
                ]
                for v, s in variants.items()
                if s["pairs"]
            ],
        )
    )
    print()
    print("Gate sweep (reuse rate over all calls; fidelity of the reused calls, full (ours)):")
    print(
        format_table(
            ["gamma", "calls", "reused", "reuse rate", "KL mean", "greedy agree", "exact match"],
            [
                [
                    s["gamma"],
                    s["calls"],
                    s["reused"],
                    s["reuse_rate"],
                    s.get("kl_mean", "-"),
                    s.get("agreement", "-"),
                    s.get("exact_match", "-"),
                ]
                for s in sweep
            ],
        )
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "variants": variants,
                    "gamma_sweep": sweep,
                    "seconds": time.perf_counter() - t0,
                },
                indent=1,
            )
        )
    print(f"\n[fidelity] done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

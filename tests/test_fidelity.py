"""A fast run of the fidelity harness (benchmarks/fidelity.py) on the real SmolLM2: the server's
policy against dense prefill and the baselines. The full tables come from the script
(benchmarks/RESULTS.md)."""

from __future__ import annotations

import pytest
from fidelity import ESTIMATED, PIECEWISE, SERVER, Harness, summarize

from sglang_kvcomm.assets.datasets import gsm8k


@pytest.fixture(scope="module")
def run(hf_models):
    harness = Harness(hf_models("smollm2"), agents=3, response=12, free=6)
    records = []
    for problem in gsm8k(limit=5):
        calls, recs = harness.question(problem.question)
        records += recs
    return harness, calls, records


def test_the_program_is_served_like_the_server(run):
    harness, calls, records = run
    assert [len(c.layout.spans) for c in calls] == [1, 2, 3]  # the question, then answers
    assert len(records) == 15
    # agent 1 is the first to read each question: its prefill gives the base, it never reuses
    assert all(r["decision"] == "no base KV" for r in records[0::3])
    summary = summarize(records)
    assert summary["calls"] == 15 and summary["reused"] == sum(
        r["decision"] == "reuse" for r in records
    )


def test_variants_against_dense_prefill(run):
    _, _, records = run
    summary = summarize(records)
    variants = summary["variants"]
    assert {SERVER, *PIECEWISE} <= set(variants) <= {*ESTIMATED, *PIECEWISE}
    assert variants[SERVER]["calls"] >= 3  # token-matched pools warm after two dense calls
    naive, server = variants["naive reuse"], variants[SERVER]
    assert naive["kl_mean"] > 4 * server["kl_mean"]
    assert naive["top1"] <= server["top1"]
    for name, v in variants.items():
        assert 0.0 <= v["top1"] <= 1.0 and v["kl_mean"] >= -1e-6, name
    assert summary["paired"].keys() <= variants.keys()


def test_the_server_prefills_the_final_segment(run):
    harness, calls, _ = run
    call = calls[-1]  # agent 3 of the last question: its pools are warm
    layout = call.layout
    plan = harness.planners[SERVER].plan(layout, layout.spans[0][0], len(layout.tokens) - 1)
    assert plan.end == layout.spans[-1][1]  # the lead-in to the answer is not estimated

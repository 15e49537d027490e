"""KVCOMM reuse end to end: the fully connected program over a stream of GSM8K questions on the
--kvcomm CPU server with the real SmolLM2, checked against a stock server.

One module-scoped run does the work in a fixed order, the tests assert on its record:

1. flush both servers; the program runs on the kvcomm server (a canonical reader that gives each
   question its base KV, 3 agents ``approx``, the decision agent ``exact``), each call recorded
   with the server's per-request report;
2. the stock server receives every call the kvcomm server prefilled densely, in the same order,
   so both radix trees hold the same exact KV (reused calls insert nothing);
3. every reused call is replayed on both servers as ``exact`` and as a plain request (no kvcomm
   metadata), with logprobs: both must be bit-identical across servers, which they cannot be if
   estimated KV leaked into the tree; the ``exact`` replay is the dense answer the reused call's
   greedy output is compared with;
4. flush: the allocator's free count must be back to its start, anchors and bases gone.
"""

from __future__ import annotations

import copy

import pytest
import requests

pytestmark = pytest.mark.e2e

QUESTIONS = 6
GREEDY_TOKENS = 32
# SmolLM2 in the fidelity harness (benchmarks/RESULTS.md, "Fidelity of estimated KV vs dense
# prefill"): the full estimate's 32-token greedy agreement with dense prefill is 0.50.
AGREEMENT_BAR = 0.50


def _stats(url: str) -> dict:
    return requests.get(url + "/kvcomm/stats", timeout=30).json()


def _post(url: str, body: dict) -> dict:
    res = requests.post(url + "/generate", json=body, timeout=300)
    assert res.status_code == 200, res.text
    return res.json()


def _with_logprobs(body: dict, mode: str | None) -> dict:
    body = copy.deepcopy(body)
    body["return_logprob"] = True
    # only the first GREEDY_TOKENS are compared: a longer replay costs CI time and asserts nothing
    body["sampling_params"]["max_new_tokens"] = GREEDY_TOKENS
    if mode is None:
        del body["sampling_params"]["custom_params"]
    else:
        body["sampling_params"]["custom_params"]["kvcomm_mode"] = mode
    return body


def _agreement(a: list[int], b: list[int]) -> float:
    a, b = a[:GREEDY_TOKENS], b[:GREEDY_TOKENS]
    return sum(x == y for x, y in zip(a, b, strict=False)) / max(len(a), len(b), 1)


@pytest.fixture(scope="module")
def run(servers):
    from kvcomm_frontend import CANONICAL_READER, KVCommEndpoint, fully_connected
    from sglang_kvcomm.assets.datasets import gsm8k

    kvcomm, stock = servers["kvcomm"].url, servers["stock"].url
    for url in (kvcomm, stock):
        assert requests.post(url + "/flush_cache", timeout=30).status_code == 200
    start = _stats(kvcomm)

    endpoint = KVCommEndpoint(kvcomm)
    for problem in gsm8k(limit=QUESTIONS):
        fully_connected.run(
            question=problem.question,
            max_tokens=48,
            decision_max_tokens=16,
            base=CANONICAL_READER,
            backend=endpoint,
        )
    calls = list(endpoint.calls)
    after_workload = _stats(kvcomm)
    metrics = requests.get(kvcomm + "/metrics", timeout=30).text

    for call in calls:
        if call.kvcomm["decision"] != "reuse":
            _post(stock, call.body)

    replays = []
    for call in calls:
        if call.kvcomm["decision"] == "reuse":
            pair = {}
            for mode in ("exact", None):
                body = _with_logprobs(call.body, mode)
                pair[mode or "plain"] = (_post(kvcomm, body), _post(stock, body))
            replays.append((call, pair))
    after_replays = _stats(kvcomm)

    assert requests.post(kvcomm + "/flush_cache", timeout=30).status_code == 200
    return {
        "calls": calls,
        "replays": replays,
        "start": start,
        "after_workload": after_workload,
        "metrics": metrics,
        "after_replays": after_replays,
        "flushed": _stats(kvcomm),
    }


def test_every_agent_reuses_after_warm_up(run):
    from kvcomm_frontend import CANONICAL_READER, MATH_ROLES

    calls = run["calls"]
    assert len(calls) == 5 * QUESTIONS
    reports = [c.kvcomm for c in calls]
    assert all(r["agent"] == c.agent for r, c in zip(reports, calls, strict=True))
    for call, report in zip(calls, reports, strict=True):
        assert (
            report["tokens_exact"] + report["tokens_estimated"] + report["tokens_prefilled"]
            == (call.meta["prompt_tokens"])
        )
    assert reports[0] == {**reports[0], "decision": "dense", "reason": "prefix not cached"}
    decision_agent = [r for c, r in zip(calls, reports, strict=True) if c.mode == "exact"]
    assert len(decision_agent) == QUESTIONS
    assert all(r["decision"] == "dense" and r["reason"] == "mode exact" for r in decision_agent)

    reused = [r for r in reports if r["decision"] == "reuse"]
    assert reused, [r["reason"] for r in reports]
    # the reader is the first to see each question: it gives the base and never reuses; agent 1,
    # whose prompt gave the base without the reader, reuses too
    readers = [r for r in reports if r["agent"] == CANONICAL_READER.name]
    assert len(readers) == QUESTIONS and all(
        r["reason"] in {"no base KV", "prefix not cached"} for r in readers
    )
    assert {r["agent"] for r in reused} == {role.name for role in MATH_ROLES[:3]}
    # the final segment (the lead-in to the answer, at most --kvcomm-exact-final 64) is prefilled
    assert all(0 < r["tokens_prefilled"] <= 64 and r["tokens_estimated"] > 0 for r in reused)

    delta = {
        k: run["after_workload"]["requests"][k] - run["start"]["requests"][k]
        for k in ("reuse", "dense", "off")
    }
    assert delta == {"reuse": len(reused), "dense": len(calls) - len(reused), "off": 0}
    assert run["after_workload"]["reuse_rate"] > 0
    assert run["after_workload"]["tokens_estimated"] - run["start"]["tokens_estimated"] == sum(
        r["tokens_estimated"] for r in reused
    )
    assert run["after_workload"]["anchors"] > 0
    assert run["after_workload"]["anchor_bytes"] > 0 and run["after_workload"]["base_bytes"] > 0


def test_prometheus_metrics_match_the_stats(run):
    """With --enable-metrics the counters of /kvcomm/stats are also on SGLang's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(run["metrics"]):
        for s in family.samples:
            if s.name.startswith("sglang:kvcomm_"):
                labels = {k: v for k, v in s.labels.items() if k != "model_name"}
                samples[(s.name, tuple(sorted(labels.items())))] = s.value
    stats = run["after_workload"]
    for decision, n in stats["requests"].items():
        assert samples[("sglang:kvcomm_requests_total", (("decision", decision),))] == n
    for reason, n in stats["fallbacks"].items():
        assert samples[("sglang:kvcomm_fallbacks_total", (("reason", reason),))] == n
    for kind in ("exact", "estimated", "prefilled"):
        key = "tokens_matched_exact" if kind == "exact" else f"tokens_{kind}"
        assert samples[("sglang:kvcomm_prompt_tokens_total", (("kind", kind),))] == stats[key]
    assert samples[("sglang:kvcomm_anchors", ())] == stats["anchors"]
    assert samples[("sglang:kvcomm_held_bytes", (("kind", "base"),))] == stats["base_bytes"]


def test_reused_calls_agree_with_dense_prefill(run):
    scores = [
        _agreement(call.output_ids, pair["exact"][0]["output_ids"]) for call, pair in run["replays"]
    ]
    mean = sum(scores) / len(scores)
    assert mean >= AGREEMENT_BAR, f"greedy agreement {mean:.2f} over {len(scores)} reused calls"


@pytest.mark.parametrize("mode", ["exact", "plain"])
def test_exact_and_plain_requests_never_see_estimated_kv(run, mode):
    assert run["replays"]
    for call, pair in run["replays"]:
        on_kvcomm, on_stock = pair[mode]
        assert on_kvcomm["output_ids"] == on_stock["output_ids"], call.agent
        for key in ("output_token_logprobs", "cached_tokens"):
            assert on_kvcomm["meta_info"][key] == on_stock["meta_info"][key], (call.agent, key)
        if mode == "exact":
            assert on_kvcomm["meta_info"]["kvcomm"][0]["decision"] == "dense"
            assert on_kvcomm["meta_info"]["kvcomm"][0]["tokens_estimated"] == 0
        else:
            assert "kvcomm" not in on_kvcomm["meta_info"]
    assert run["after_replays"]["tokens_estimated"] == run["after_workload"]["tokens_estimated"]


def test_flush_returns_every_slot_and_forgets_anchors_and_bases(run):
    start, flushed = run["start"], run["flushed"]
    assert flushed["kv_pool"] == start["kv_pool"]
    assert flushed["kv_pool"]["evictable"] == 0 and flushed["kv_pool"]["protected"] == 0
    assert flushed["pending_estimates"] == 0
    held = ("anchors", "bases", "anchor_bytes", "base_bytes")
    assert {k: flushed[k] for k in held} == dict.fromkeys(held, 0)

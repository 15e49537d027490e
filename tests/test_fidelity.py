"""A fast run of the fidelity harness (benchmarks/fidelity.py) on the real SmolLM2: estimated KV
against dense prefill. The full tables come from the script (benchmarks/RESULTS.md)."""

from __future__ import annotations

import pytest
from fidelity import Harness, build_stream, run_gamma, run_variants, summarize


@pytest.fixture(scope="module")
def harness_and_stream(hf_models):
    harness = Harness(hf_models("smollm2"), agents=3, decode=8)
    return harness, build_stream(harness, contents=8, response_tokens=32)


def test_variants_against_dense_prefill(harness_and_stream):
    harness, stream = harness_and_stream
    assert [c.kind for c in stream] == ["question", "response"] * 4
    results = {v: summarize(s) for v, s in run_variants(harness, stream, gamma=0.3).items()}
    naive = results.pop("naive reuse (no rotation)")
    assert all(r["pairs"] >= 9 for r in results.values())  # pools warm up per (agent, slot)
    for variant, r in results.items():
        assert r["kv_error_per_layer"][0] < 1e-5, variant  # layer 0: rotation alone is exact
        assert naive["kl_mean"] > 4 * r["kl_mean"], variant
        assert naive["agreement"] < r["agreement"], variant
    assert naive["kv_error_per_layer"][0] > 0.1  # without rotation even layer 0 is wrong
    # blending the following segment's KV observed in the anchors' contexts beats shifting a
    # template computed without the content
    assert (
        results["rotation + following offset"]["kv_error_mean"]
        < results["rotation only"]["kv_error_mean"]
    )


def test_gate_sweep_reuses_more_as_gamma_grows(harness_and_stream):
    harness, stream = harness_and_stream
    sweep = [run_gamma(harness, stream, gamma) for gamma in (0.1, 0.9)]
    assert all(s["calls"] == 3 * len(stream) for s in sweep)
    assert 0 < sweep[0]["reuse_rate"] <= sweep[1]["reuse_rate"] < 1  # warm-up calls are dense
    assert sweep[1]["pairs"] == sweep[1]["reused"] and sweep[1]["kl_mean"] < 1.0

"""End to end on real CPU servers with the real SmolLM2 (the ``servers`` fixture): start-up,
flags, the protocol's 400s, and a --kvcomm server serving exact, off and plain requests exactly
like a stock server. Reuse itself: ``test_e2e_reuse.py``."""

from __future__ import annotations

import time

import pytest
import requests

from sglang_kvcomm.server_process import ServerProcess, ServerStartError

pytestmark = pytest.mark.e2e


def _flush(*urls: str) -> None:
    for url in urls:
        assert requests.post(url + "/flush_cache", timeout=30).status_code == 200


def _generate(url: str, **body) -> dict:
    res = requests.post(url + "/generate", json=body, timeout=120)
    assert res.status_code == 200, res.text
    return res.json()


def test_stats_report_the_configuration_the_scheduler_received(servers):
    stats = requests.get(servers["kvcomm"].url + "/kvcomm/stats", timeout=30).json()
    assert stats["config"] == {
        "threshold": 0.5,
        "max_anchors": 8,
        "window": 3,
        "max_memory_mb": 1024,
        "tail_tokens": None,
        "exact_final": 64,
        "placeholder": "token",
    }
    assert stats["rope"] == {"layout": "neox", "head_dim": 64}  # checked against the model
    assert set(stats["requests"]) == {"reuse", "dense", "off"}
    assert stats["max_bytes"] == 1024 << 20
    assert stats["tail_tokens"] == 1  # CPU: no prefill CUDA graphs to feed
    info = requests.get(servers["kvcomm"].url + "/server_info", timeout=30).json()
    assert info["radix_cache_backend"] == "kvcomm"
    assert "KVCOMM tree cache: threshold=0.5 max_anchors(V)=8 window(W)=3" in (
        servers["kvcomm"].log_path.read_text()
    )


def test_stock_server_is_untouched(servers):
    url = servers["stock"].url
    assert requests.get(url + "/kvcomm/stats", timeout=30).status_code == 404
    info = requests.get(url + "/server_info", timeout=30).json()
    assert info["radix_cache_backend"] is None
    assert all("kvcomm" not in state for state in info["internal_states"])
    assert "KVCOMM tree cache" not in servers["stock"].log_path.read_text()


@pytest.mark.parametrize("mode", ["exact", "off"])
def test_program_outputs_match_stock_server(servers, mode):
    from kvcomm_frontend import KVCommEndpoint, fully_connected
    from sglang_kvcomm.assets.datasets import gsm8k

    _flush(servers["stock"].url, servers["kvcomm"].url)
    before = requests.get(servers["kvcomm"].url + "/kvcomm/stats", timeout=30).json()
    outputs = {}
    for name in ("stock", "kvcomm"):
        backend = KVCommEndpoint(servers[name].url, mode=mode)
        outputs[name] = [
            [
                (
                    r["agent"],
                    r["answer"],
                    r["meta"]["prompt_tokens"],
                    r["meta"]["completion_tokens"],
                )
                for r in fully_connected.run(
                    question=p.question, max_tokens=32, decision_max_tokens=12, backend=backend
                ).ret_value
            ]
            for p in gsm8k(limit=2)
        ]
    assert outputs["kvcomm"] == outputs["stock"]
    assert len(outputs["stock"]) == 2 and all(len(q) == 4 for q in outputs["stock"])
    assert all(answer for q in outputs["stock"] for _, answer, _, _ in q)
    after = requests.get(servers["kvcomm"].url + "/kvcomm/stats", timeout=30).json()
    assert after["tokens_estimated"] == before["tokens_estimated"]
    assert after["requests"]["reuse"] == before["requests"]["reuse"]
    assert after["requests"][mode if mode == "off" else "dense"] == (
        before["requests"][mode if mode == "off" else "dense"] + 8
    )


def test_logprobs_are_bit_identical(servers):
    body = dict(
        text="Question: what is 12 times 7? Answer:",
        return_logprob=True,
        logprob_start_len=0,
        sampling_params={"max_new_tokens": 16, "temperature": 0},
    )
    _flush(servers["stock"].url, servers["kvcomm"].url)
    results = {
        name: [_generate(servers[name].url, **body) for _ in range(2)]  # cold, then cached
        for name in ("stock", "kvcomm")
    }
    for a, b in zip(results["stock"], results["kvcomm"], strict=True):
        assert a["output_ids"] == b["output_ids"]
        for key in ("input_token_logprobs", "output_token_logprobs"):
            assert a["meta_info"][key] == b["meta_info"][key]


def test_repeated_prefix_is_served_from_cache(servers):
    ids = list(range(1000, 1100))
    body = dict(input_ids=ids, sampling_params={"max_new_tokens": 4, "temperature": 0})
    _flush(servers["stock"].url, servers["kvcomm"].url)
    cached = {}
    for name in ("stock", "kvcomm"):
        first = _generate(servers[name].url, **body)["meta_info"]
        second = _generate(servers[name].url, **body)["meta_info"]
        assert first["cached_tokens"] == 0
        cached[name] = second["cached_tokens"]
    assert cached["kvcomm"] > 0
    assert cached["kvcomm"] == cached["stock"] == len(ids) - 1


def test_bad_flag_stops_start_up_with_one_line(smollm2_dir, tmp_path):
    t0 = time.monotonic()
    server = ServerProcess(
        smollm2_dir,
        ["--kvcomm", "--kvcomm-window", "0"],
        log_path=tmp_path / "bad.log",
        start_timeout_s=120,
    )
    with pytest.raises(ServerStartError, match="exited with code 2") as info:
        server.start()
    assert "sglang: error: --kvcomm-window must be in [1, --kvcomm-max-anchors=20], got 0" in (
        str(info.value)
    )
    assert time.monotonic() - t0 < 120


def test_server_that_cannot_start_fails_with_its_log(tmp_path):
    server = ServerProcess(
        tmp_path / "no-such-model", [], log_path=tmp_path / "srv.log", start_timeout_s=120
    )
    with pytest.raises(ServerStartError, match="log tail"):
        server.start()
    assert server.proc is None  # stopped and reaped


MALFORMED = [
    ({"kvcomm_spans": [2, 500]}, "span 0 ends at 500, past the 20 input_ids"),
    ({"kvcomm_spans": [0, 8, 4, 12]}, "in order and disjoint"),
    ({"kvcomm_spans": [9, 3]}, "0 <= start < end"),
    ({"kvcomm_spans": [1.5, 3]}, "must be an integer"),
    ({"kvcomm_mode": "fast"}, "kvcomm_mode must be one of"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("custom", "message"), MALFORMED)
def test_malformed_metadata_gets_a_400_and_the_server_keeps_serving(
    servers, custom, message, stream
):
    """Streamed too: the 400 comes before the stream opens, not as an error event after 200."""
    body = dict(
        input_ids=list(range(100, 120)),
        sampling_params={"max_new_tokens": 2, "temperature": 0, "custom_params": custom},
        stream=stream,
    )
    res = requests.post(servers["kvcomm"].url + "/generate", json=body, timeout=60)
    assert res.status_code == 400, res.text
    assert message in res.json()["error"]["message"]
    ok = requests.post(
        servers["kvcomm"].url + "/generate",
        timeout=60,
        json=dict(input_ids=list(range(100, 120)), sampling_params={"max_new_tokens": 2}),
    )
    assert ok.status_code == 200


def test_spans_on_a_text_request_get_a_400(servers):
    body = dict(
        text="Hello there",
        sampling_params={"max_new_tokens": 2, "custom_params": {"kvcomm_spans": [0, 1]}},
    )
    res = requests.post(servers["kvcomm"].url + "/generate", json=body, timeout=60)
    assert res.status_code == 400
    assert "send input_ids, not text" in res.json()["error"]["message"]


def test_stock_server_ignores_kvcomm_metadata(servers):
    body = dict(
        input_ids=list(range(100, 120)),
        sampling_params={"max_new_tokens": 2, "custom_params": {"kvcomm_spans": [2, 500]}},
    )
    assert requests.post(servers["stock"].url + "/generate", json=body, timeout=60).ok

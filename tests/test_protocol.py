"""The shared-segment wire protocol: valid metadata parses, malformed metadata is refused with a
message that names the field."""

from __future__ import annotations

import pytest

from sglang_kvcomm.protocol import (
    KVCommRequest,
    ProtocolError,
    SharedSegment,
    from_custom_params,
    report_from_meta,
)


def test_plain_requests_have_no_metadata():
    assert from_custom_params(None, 10) is None
    assert from_custom_params({"other": 1}, 10) is None


def test_valid_metadata():
    got = from_custom_params(
        {
            "kvcomm_mode": "approx",
            "kvcomm_agent": "solver",
            "kvcomm_spans": [2, 5, 5, 9],
            "unrelated": 3,
        },
        10,
    )
    assert got == KVCommRequest("approx", "solver", (SharedSegment(2, 5), SharedSegment(5, 9)))
    assert got.segments[0].length == 3
    assert from_custom_params({"kvcomm_spans": [0, 1]}, 1).segments == (SharedSegment(0, 1),)
    assert from_custom_params({"kvcomm_mode": "exact"}, None) == KVCommRequest("exact")


@pytest.mark.parametrize(
    ("params", "num_ids", "message"),
    [
        ({"kvcomm_spans": [2, 12]}, 10, "span 0 ends at 12, past the 10 input_ids"),
        ({"kvcomm_spans": [-1, 3]}, 10, r"0 <= start < end, got \[-1, 3\)"),
        ({"kvcomm_spans": [0, 4, 3, 6]}, 10, "span 1 starts at 3, before the end of span 0"),
        ({"kvcomm_spans": [5, 8, 0, 2]}, 10, "in order and disjoint"),
        ({"kvcomm_spans": [6, 2]}, 10, r"start < end, got \[6, 2\)"),
        ({"kvcomm_spans": [3, 3]}, 10, "start < end"),
        ({"kvcomm_spans": [1.0, 3]}, 10, r"kvcomm_spans\[0\] must be an integer, got 1\.0"),
        ({"kvcomm_spans": ["1", 3]}, 10, "must be an integer"),
        ({"kvcomm_spans": [True, 3]}, 10, "must be an integer"),
        ({"kvcomm_spans": [1, 3, 5]}, 10, "flat list of start, end pairs"),
        ({"kvcomm_spans": {"start": 1}}, 10, "flat list"),
        ({"kvcomm_mode": "fast"}, 10, r"must be one of \['approx', 'exact', 'off'\], got 'fast'"),
        ({"kvcomm_spans": [1, 3]}, None, "send input_ids, not text"),
        ({"kvcomm_agent": 7}, 10, "kvcomm_agent must be a string"),
        ({"kvcomm_agent": None}, 10, "kvcomm_agent must be a string"),
        ({"kvcomm_spans": [1, 3], "kvcomm_ids": ["a"]}, 10, "unknown keys"),
        ({"kvcomm_modes": "exact"}, 10, r"unknown keys \['kvcomm_modes'\]"),
    ],
)
def test_malformed_metadata_is_refused(params, num_ids, message):
    with pytest.raises(ProtocolError, match=message):
        from_custom_params(params, num_ids)


def test_custom_params_must_be_an_object():
    with pytest.raises(ProtocolError, match="custom_params must be an object"):
        from_custom_params([1, 2], 10)


def test_report_from_meta_unwraps_the_per_request_list():
    report = {"decision": "reuse", "tokens_estimated": 40}
    assert report_from_meta({"kvcomm": [report]}) == report
    # a stock server sends no key; a request the extension never saw has None
    assert report_from_meta({"prompt_tokens": 9}) == {}
    assert report_from_meta({"kvcomm": [None]}) == {}


def _body(**obj) -> bytes:
    import json

    return json.dumps(obj).encode()


def test_streamed_bodies_are_checked_before_the_stream_opens():
    from sglang_kvcomm.http_routes import streamed_metadata_error

    bad = {"custom_params": {"kvcomm_spans": [2, 500]}}
    assert "past the 4 input_ids" in streamed_metadata_error(
        _body(input_ids=[1, 2, 3, 4], sampling_params=bad, stream=True)
    )
    # a batch: the second item's spans run past its own ids
    assert "past the 2 input_ids" in streamed_metadata_error(
        _body(
            input_ids=[[1, 2, 3, 4, 5, 6], [1, 2]],
            sampling_params=[{}, {"custom_params": {"kvcomm_spans": [0, 4]}}],
            stream=True,
        )
    )
    assert "send input_ids, not text" in streamed_metadata_error(
        _body(text="hi", sampling_params={"custom_params": {"kvcomm_spans": [0, 1]}}, stream=True)
    )
    assert "must be an object" in streamed_metadata_error(
        _body(input_ids=[1, 2], sampling_params={"custom_params": [1]}, stream=True)
    )
    # left to SGLang's own validation: not streamed, valid, no metadata, not JSON
    assert streamed_metadata_error(_body(input_ids=[1, 2], sampling_params=bad)) is None
    ok = {"custom_params": {"kvcomm_spans": [0, 2]}}
    assert streamed_metadata_error(_body(input_ids=[1, 2], sampling_params=ok, stream=True)) is None
    assert streamed_metadata_error(_body(input_ids=[1, 2], stream=True)) is None
    assert streamed_metadata_error(b"{custom_params not json") is None

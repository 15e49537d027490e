"""The shared-segment wire protocol: valid metadata parses, malformed metadata is refused with a
message that names the field."""

from __future__ import annotations

import pytest

from sglang_kvcomm.protocol import (
    KVCommRequest,
    ProtocolError,
    SharedSegment,
    from_custom_params,
)


def _meta(**kvcomm):
    return {"kvcomm": kvcomm}


def test_plain_requests_have_no_metadata():
    assert from_custom_params(None, 10) is None
    assert from_custom_params({"other": 1}, 10) is None


def test_valid_metadata():
    got = from_custom_params(
        _meta(
            mode="approx",
            agent="solver",
            segments=[{"start": 2, "end": 5, "id": "q1"}, {"start": 5, "end": 9}],
        ),
        10,
    )
    assert got == KVCommRequest(
        "approx", "solver", (SharedSegment(2, 5, "q1"), SharedSegment(5, 9, None))
    )
    assert got.segments[0].length == 3
    assert from_custom_params(_meta(), None) == KVCommRequest()  # defaults; text is fine
    assert from_custom_params(_meta(mode="exact"), None).mode == "exact"


@pytest.mark.parametrize(
    ("kvcomm", "num_ids", "message"),
    [
        ({"segments": [{"start": 2, "end": 12}]}, 10, r"segments\[0\] ends at 12, past the 10"),
        ({"segments": [{"start": -1, "end": 3}]}, 10, r"0 <= start < end"),
        (
            {"segments": [{"start": 0, "end": 4}, {"start": 3, "end": 6}]},
            10,
            r"segments\[1\] starts at 3.*in order and disjoint",
        ),
        ({"segments": [{"start": 5, "end": 8}, {"start": 0, "end": 2}]}, 10, "in order"),
        ({"segments": [{"start": 6, "end": 2}]}, 10, r"start < end, got \[6, 2\)"),
        ({"segments": [{"start": 3, "end": 3}]}, 10, "start < end"),
        ({"segments": [{"start": 1.0, "end": 3}]}, 10, r"start must be an integer, got 1\.0"),
        ({"segments": [{"start": "1", "end": 3}]}, 10, "start must be an integer"),
        ({"segments": [{"start": True, "end": 3}]}, 10, "start must be an integer"),
        ({"segments": [{"start": 1}]}, 10, "end must be an integer, got None"),
        ({"segments": [[1, 3]]}, 10, "must be an object"),
        ({"segments": {"start": 1, "end": 3}}, 10, "segments must be a list"),
        ({"segments": [{"start": 1, "end": 3, "len": 2}]}, 10, r"unknown keys \['len'\]"),
        ({"mode": "fast"}, 10, r"mode must be one of \['approx', 'exact', 'off'\], got 'fast'"),
        ({"segments": [{"start": 1, "end": 3}]}, None, "send input_ids, not text"),
        ({"agent": 7}, 10, "agent must be a string"),
        ({"segments": [{"start": 1, "end": 3, "id": 5}]}, 10, "id must be a string"),
        ({"modes": "exact"}, 10, r"unknown keys \['modes'\]"),
    ],
)
def test_malformed_metadata_is_refused(kvcomm, num_ids, message):
    with pytest.raises(ProtocolError, match=message):
        from_custom_params({"kvcomm": kvcomm}, num_ids)


def test_wrong_container_types():
    with pytest.raises(ProtocolError, match="custom_params must be an object"):
        from_custom_params([1, 2], 10)
    with pytest.raises(ProtocolError, match="must be an object, got str"):
        from_custom_params({"kvcomm": "approx"}, 10)

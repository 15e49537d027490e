"""--kvcomm flags: parsing through SGLang's own parser, validation, transport to schedulers."""

from __future__ import annotations

import argparse
import json

import pytest

from sglang_kvcomm.config import (
    ENV_VAR,
    KVCommConfig,
    KVCommConfigError,
    add_cli_args,
    config_from_cli_args,
)


def _parse(argv: list[str]) -> argparse.Namespace:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)  # stock flags; ours come from the plugin hook or add_cli_args
    if not any("--kvcomm" in a.option_strings for a in parser._actions):
        add_cli_args(parser)
    return parser.parse_args(["--model-path", "unused", *argv])


def test_defaults_are_the_papers_pool_and_the_calibrated_gate():
    config = config_from_cli_args(_parse(["--kvcomm"]))
    # V and W as the paper; the error gate's limit from the fidelity harness (RESULTS.md)
    assert config == KVCommConfig(threshold=0.2, max_anchors=20, window=5)


def test_values_parse_and_select_the_backend():
    args = _parse(
        [
            "--kvcomm",
            "--kvcomm-threshold",
            "0.5",
            "--kvcomm-max-anchors",
            "8",
            "--kvcomm-window",
            "8",
        ]
    )
    config = config_from_cli_args(args)
    assert (config.threshold, config.max_anchors, config.window) == (0.5, 8, 8)
    assert args.radix_cache_backend == "kvcomm"


def test_without_kvcomm_nothing_changes():
    args = _parse([])
    assert config_from_cli_args(args) is None
    assert args.radix_cache_backend is None


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--kvcomm", "--kvcomm-threshold", "1.01"], "--kvcomm-threshold"),
        (["--kvcomm", "--kvcomm-threshold", "-0.1"], "--kvcomm-threshold"),
        (["--kvcomm", "--kvcomm-max-anchors", "1"], "--kvcomm-max-anchors"),
        (["--kvcomm", "--kvcomm-window", "0"], "--kvcomm-window"),
        (["--kvcomm", "--kvcomm-max-anchors", "4", "--kvcomm-window", "5"], "--kvcomm-window"),
        (["--kvcomm", "--kvcomm-max-memory-mb", "0"], "--kvcomm-max-memory-mb"),
        (["--kvcomm", "--kvcomm-tail-tokens", "0"], "--kvcomm-tail-tokens"),
        (["--kvcomm", "--kvcomm-exact-final", "-1"], "--kvcomm-exact-final"),
        (["--kvcomm", "--kvcomm-placeholder", "nearest"], "--kvcomm-placeholder"),
        (["--kvcomm-threshold", "0.5"], "--kvcomm-threshold"),  # option without --kvcomm
        (["--kvcomm", "--disable-radix-cache"], "--disable-radix-cache"),
        (["--kvcomm", "--radix-cache-backend", "other"], "--radix-cache-backend"),
        (["--kvcomm", "--tp-size", "2"], "--tp-size"),
        (["--kvcomm", "--pp-size", "2"], "--pp-size"),
        (["--kvcomm", "--dp-size", "2", "--enable-dp-attention"], "--enable-dp-attention"),
        (["--kvcomm", "--speculative-algorithm", "EAGLE"], "--speculative-algorithm"),
        (["--kvcomm", "--disaggregation-mode", "prefill"], "--disaggregation-mode"),
    ],
)
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(KVCommConfigError, match=flag):
        config_from_cli_args(_parse(argv))


@pytest.mark.parametrize(("threshold", "max_anchors", "window"), [(0.0, 2, 1), (1.0, 2, 2)])
def test_edges_are_accepted(threshold, max_anchors, window):
    KVCommConfig(threshold=threshold, max_anchors=max_anchors, window=window)


def test_data_parallel_replicas_are_served():
    """--dp-size without dp-attention runs independent schedulers, each with its own cache."""
    assert config_from_cli_args(_parse(["--kvcomm", "--dp-size", "2"])) is not None


def test_non_numbers_are_refused_by_argparse():
    with pytest.raises(SystemExit):
        _parse(["--kvcomm", "--kvcomm-max-anchors", "many"])


def test_env_round_trip():
    config = KVCommConfig(threshold=0.7, max_anchors=9, window=4)
    assert KVCommConfig.from_env({ENV_VAR: config.to_json()}) == config
    assert KVCommConfig.from_env({}) == KVCommConfig()


@pytest.mark.parametrize(
    "raw", ["not json", json.dumps({"gamma": 1}), json.dumps({"threshold": 3})]
)
def test_env_garbage_is_refused(raw):
    with pytest.raises(KVCommConfigError):
        KVCommConfig.from_env({ENV_VAR: raw})

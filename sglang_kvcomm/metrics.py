"""The extension's counters in SGLang's Prometheus ``/metrics`` (``--enable-metrics``).

SGLang serves ``/metrics`` from the HTTP process in Prometheus multiprocess mode: it sets
``PROMETHEUS_MULTIPROC_DIR`` before the schedulers spawn, so metrics created in a scheduler land
in that directory and show on ``/metrics``. Counters sum over schedulers; gauges are
``livesum`` (the total held by live schedulers). Created once per scheduler process.
"""

from __future__ import annotations

from sglang_kvcomm.stats import DECISIONS

_TOKEN_KINDS = (
    ("exact", "tokens_exact"),
    ("estimated", "tokens_estimated"),
    ("prefilled", "tokens_prefilled"),
)


class KVCommMetrics:
    def __init__(self, model_name: str) -> None:
        # imported here: prometheus_client reads PROMETHEUS_MULTIPROC_DIR at import
        from prometheus_client import Counter, Gauge

        labels = {"model_name": model_name}
        names = list(labels)
        self.labels = labels
        self.requests = Counter(
            "sglang:kvcomm_requests_total",
            "Finished requests with kvcomm metadata, by final decision (reuse, dense, off).",
            [*names, "decision"],
        )
        self.fallbacks = Counter(
            "sglang:kvcomm_fallbacks_total",
            "Finished requests prefilled densely, by fallback reason.",
            [*names, "reason"],
        )
        self.tokens = Counter(
            "sglang:kvcomm_prompt_tokens_total",
            "Prompt tokens of finished kvcomm requests: matched exactly, estimated, prefilled.",
            [*names, "kind"],
        )
        self.released = Counter(
            "sglang:kvcomm_estimates_released_total",
            "Estimates freed because their request was not admitted in the same round.",
            names,
        )
        self.held_bytes = Gauge(
            "sglang:kvcomm_held_bytes",
            "Bytes held for reuse (kind=base: base KV, kind=anchor: anchor offsets).",
            [*names, "kind"],
            multiprocess_mode="livesum",
        )
        self.anchors = Gauge(
            "sglang:kvcomm_anchors",
            "Anchors held in all anchor pools.",
            names,
            multiprocess_mode="livesum",
        )
        self.pending = Gauge(
            "sglang:kvcomm_pending_estimates",
            "Estimates held by requests not admitted yet (freed at the end of every round).",
            names,
            multiprocess_mode="livesum",
        )
        for decision in DECISIONS:  # every series exists from the start, at 0
            self.requests.labels(**labels, decision=decision)
        for kind, _ in _TOKEN_KINDS:
            self.tokens.labels(**labels, kind=kind)

    def count(self, report: dict) -> None:
        """One finished request's final decision (the report of ``tree_cache._record``)."""
        self.requests.labels(**self.labels, decision=report["decision"]).inc()
        if report["decision"] == "dense":
            self.fallbacks.labels(**self.labels, reason=report["reason"]).inc()
        for kind, key in _TOKEN_KINDS:
            self.tokens.labels(**self.labels, kind=kind).inc(report[key])

    def held(self, memory: dict, pending: int) -> None:
        """``memory``: ``KVComm.report()``."""
        self.held_bytes.labels(**self.labels, kind="base").set(memory["base_bytes"])
        self.held_bytes.labels(**self.labels, kind="anchor").set(memory["anchor_bytes"])
        self.anchors.labels(**self.labels).set(memory["anchors"])
        self.pending.labels(**self.labels).set(pending)

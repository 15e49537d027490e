"""Stress suite for a ``--kvcomm`` server: hostile metadata, concurrency, disconnects, timeouts
and a tiny KV pool, on real CPU SGLang servers with SmolLM2 (started here on 127.0.0.1).

Sections (``--only`` picks some; each bounded in count and in time):

  fuzz         seeded random ``sampling_params.custom_params`` (valid, malformed, huge, nested,
               wrong types, spans on text requests, unknown ``kvcomm_*`` keys), each sent plain
               and streamed. An oracle written here from the README's rules (not protocol.py)
               classifies every case: valid ones must be served, malformed ones refused with a
               400 naming the field (streamed: before the stream opens), values outside
               SGLang's own custom_params contract served or refused, never a crash or a hang.
  concurrency  many multi-agent programs at once (token-id prompts quoting a shared question and
               the earlier agents' answers, marked with ``kvcomm_spans``): no failed request,
               reuse counted from the responses and ``/kvcomm/stats``, no leaked KV slot.
  disconnects  streamed requests closed after one or two chunks: server healthy, no leak.
  timeouts     client-side read timeouts on long generations, and server-side queue timeouts
               (``SGLANG_REQ_WAITING_TIMEOUT`` on a ``--max-running-requests 1`` server): 503s,
               server healthy, no leak.
  tinypool     a ``--kvcomm`` and a stock server with a pool of ~2x the longest prompt and
               ``--chunked-prefill-size 64``: concurrent reuse traffic without a scheduler
               crash or a leak, and ``exact`` and plain requests bit-identical to the stock
               server (greedy output ids and logprobs).

"No leak": after ``/flush_cache``, the pool's available + evictable + protected slots equal
their value at the section's start. At most two servers run at a time (fuzz, concurrency,
disconnects and client timeouts share one; queue timeouts get their own; then the tiny pair).
Prints one row per check and writes ``stress.json`` to ``--out``; exits 1 if a check fails.

    .venv/bin/python benchmarks/stress.py                                  # everything
    .venv/bin/python benchmarks/stress.py --only fuzz --fuzz-cases 200     # one section
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shlex
import socket
import string
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests
from report import format_table
from ttft import Exchange

from sglang_kvcomm.assets.models import MODELS, model_dir
from sglang_kvcomm.server_process import ServerProcess, ServerStartError, serving

SECTIONS = ("fuzz", "concurrency", "disconnects", "timeouts", "tinypool")
# The wire protocol as README.md "Marking shared segments" states it (re-derived, not imported).
MODES = ("approx", "exact", "off")
PREFIX = "kvcomm_"
MAX_AGENT = 256
INT64 = (-(2**63), 2**63 - 1)  # custom_params values must survive SGLang's msgpack IPC
QUEUE_TIMEOUT_MESSAGE = "waiting timeout"  # SGLang 0.5.17's "Request waiting timeout reached."


def say(message: str) -> None:
    print(f"[stress] {message}", flush=True)


# --- results -------------------------------------------------------------------------------


@dataclass
class Check:
    """One row of the final table: ``failures`` out of ``count``, ``figure`` says what was seen."""

    section: str
    what: str
    count: int
    failures: int
    figure: str = ""

    @property
    def passed(self) -> bool:
        return self.failures == 0


def joined(*parts: str) -> str:
    """A figure from its non-empty parts."""
    return "; ".join(p for p in parts if p)


@dataclass
class Section:
    checks: list[Check] = field(default_factory=list)
    details: dict = field(default_factory=dict)


@dataclass
class Target:
    """A server under test: its URL and whether its process still runs."""

    url: str
    alive: Callable[[], bool] = lambda: True

    @classmethod
    def of(cls, server: ServerProcess) -> Target:
        return cls(
            server.url,
            lambda: server.proc is not None and server.proc.poll() is None,
        )


class EnvServer(ServerProcess):
    """A ServerProcess whose server gets extra environment variables (ServerProcess copies
    ``os.environ`` when it launches, so they are set around that call only)."""

    def __init__(self, *args: object, env: dict[str, str] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.env = env or {}

    def launch(self) -> EnvServer:
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            super().launch()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return self


# --- HTTP ----------------------------------------------------------------------------------


@dataclass
class Reply:
    """A /generate answer. Streamed: ``data`` is the last event, ``error_event`` the message of
    an error event sent after a 200."""

    status: int | None  # None: no answer (timeout or connection error)
    data: dict | None = None
    error: str | None = None
    timed_out: bool = False
    error_event: str | None = None

    @property
    def message(self) -> str:
        return self.error_event or self.error or ""

    def completed(self, tokens: int) -> bool:
        """A 200 with ``tokens`` output tokens and no error event."""
        meta = (self.data or {}).get("meta_info") or {}
        return (
            self.status == 200
            and self.error_event is None
            and meta.get("completion_tokens") == tokens
        )


def error_message(data: object) -> str | None:
    """The message of SGLang's error bodies: ``{"error": {"message"}}`` or ``{"message"}``."""
    if not isinstance(data, dict):
        return None
    err = data.get("error")
    if isinstance(err, dict):
        return str(err.get("message"))
    if err is not None:
        return str(err)
    return str(data["message"]) if data.get("object") == "error" else None


def generate(session: requests.Session, url: str, body: dict, timeout_s: float) -> Reply:
    """POST /generate; never raises. Streamed bodies are read to ``[DONE]`` within the timeout."""
    stream = bool(body.get("stream"))
    deadline = time.monotonic() + timeout_s
    try:
        res = session.post(url + "/generate", json=body, timeout=timeout_s, stream=stream)
    except requests.Timeout:
        return Reply(None, error="client timeout", timed_out=True)
    except requests.RequestException as exc:
        return Reply(None, error=f"{type(exc).__name__}: {exc}")
    with res:
        if not stream or res.status_code != 200:
            try:
                data = res.json()
            except ValueError:
                return Reply(res.status_code, error=res.text[:500])
            return Reply(res.status_code, data, error_message(data))
        reply = Reply(res.status_code)
        try:
            for line in res.iter_lines():
                if time.monotonic() > deadline:
                    return Reply(res.status_code, reply.data, "client timeout", timed_out=True)
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    reply.error_event = error_message(event)
                else:
                    reply.data = event
        except requests.RequestException as exc:
            timed_out = "timed out" in str(exc).lower()
            return Reply(res.status_code, reply.data, f"{type(exc).__name__}: {exc}", timed_out)
        return reply


def healthy(target: Target, timeout_s: float = 60.0) -> bool:
    """The process runs and /health answers 200 (SGLang's /health runs a 1-token generation)."""
    if not target.alive():
        return False
    try:
        return requests.get(target.url + "/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def stats(url: str) -> dict:
    res = requests.get(url + "/kvcomm/stats", timeout=60)
    res.raise_for_status()
    return res.json()


def pool_total(url: str) -> tuple[int, dict]:
    """available + evictable + protected slots of the KV pool, and the three counts."""
    pool = stats(url)["kv_pool"]
    return pool["available"] + pool["evictable"] + pool["protected"], pool


def flush(url: str) -> bool:
    try:
        return requests.post(url + "/flush_cache", timeout=60).status_code == 200
    except requests.RequestException:
        return False


def settle(target: Target, start: int, timeout_s: float) -> dict:
    """Flush until the pool total is back to ``start`` or ``timeout_s`` passes. Aborts finish
    asynchronously (a non-streamed request is found disconnected within ~4 s) and a flush is
    refused while requests run, so a single flush right after a workload proves nothing."""
    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()
    while True:
        flushed = flush(target.url)
        total, pool = pool_total(target.url) if target.alive() else (-1, {})
        if (flushed and total == start) or time.monotonic() > deadline or not target.alive():
            return {
                "start": start,
                "end": total,
                "pool": pool,
                "flushed": flushed,
                "leaked": start - total,
                "waited_s": round(time.monotonic() - t0, 1),
            }
        time.sleep(1.0)


def leak_check(section: str, target: Target, start: int, timeout_s: float) -> tuple[Check, dict]:
    result = settle(target, start, timeout_s)
    pool = result["pool"]
    figure = (
        f"{result['start']} -> {result['end']} slots (available {pool.get('available')}, "
        f"evictable {pool.get('evictable')}, protected {pool.get('protected')}; "
        f"settled in {result['waited_s']}s)"
    )
    return Check(
        section,
        "pool back to start after /flush_cache",
        1,
        int(result["leaked"] != 0 or not result["flushed"]),
        figure,
    ), result


def sanity(target: Target, timeout_s: float, seed: int = 0) -> bool:
    """A plain request after the storm: served normally, 4 tokens."""
    rng = random.Random(seed)
    body = {
        "input_ids": [rng.randrange(1000, 30000) for _ in range(16)],
        "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
    }
    with requests.Session() as session:
        return generate(session, target.url, body, timeout_s).completed(4)


def after_checks(section: str, target: Target, timeout_s: float) -> list[Check]:
    """The server survived: /health, then a normal request."""
    alive = healthy(target)
    served = alive and sanity(target, timeout_s)
    return [
        Check(section, "server alive, /health 200", 1, int(not alive)),
        Check(section, "normal request served after", 1, int(not served)),
    ]


# --- fuzz: cases and oracle ----------------------------------------------------------------


@dataclass
class Case:
    index: int
    kind: str  # the generator that made it (for the record; the oracle decides the verdict)
    body: dict  # the /generate body without "stream"
    verdict: str = ""  # valid | malformed | outside (SGLang's custom_params contract)
    fields: tuple[str, ...] = ()  # what a refusal should name


def oracle(body: dict) -> tuple[str, tuple[str, ...]]:
    """The verdict on a request's custom_params from the README's rules, and the offending
    fields: ``kvcomm_mode`` one of approx|exact|off; ``kvcomm_agent`` a string of at most 256
    characters; ``kvcomm_spans`` a flat even-length list of integers, [start, end) pairs with
    0 <= start < end <= len(input_ids), in order and disjoint, and only with input_ids; any
    other ``kvcomm_*`` key is refused; custom_params itself must be an object. Other keys are
    SGLang's: scalars (64-bit integers), lists of scalars and flat objects ("valid"), anything
    else "outside" its contract (SGLang may serve or refuse it)."""
    custom = (body.get("sampling_params") or {}).get("custom_params")
    if custom is None:
        return "valid", ()
    if not isinstance(custom, dict):
        return "malformed", ("custom_params",)
    n = len(body["input_ids"]) if "input_ids" in body else None
    bad = []
    for key, value in custom.items():
        if not key.startswith(PREFIX):
            continue
        if key == "kvcomm_mode":
            ok = isinstance(value, str) and value in MODES
        elif key == "kvcomm_agent":
            ok = isinstance(value, str) and len(value) <= MAX_AGENT
        elif key == "kvcomm_spans":
            ok = spans_ok(value, n)
        else:
            ok = False
        if not ok:
            bad.append(key)
    if bad:
        return "malformed", tuple(bad)
    others = [v for k, v in custom.items() if not k.startswith(PREFIX)]
    return ("valid" if all(_in_contract(v) for v in others) else "outside"), ()


def spans_ok(spans: object, n: int | None) -> bool:
    if not isinstance(spans, list) or len(spans) % 2:
        return False
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in spans):
        return False
    if spans and n is None:
        return False
    end = 0
    for start, stop in zip(spans[0::2], spans[1::2], strict=True):
        if not (end <= start < stop <= n):  # end starts at 0: 0 <= start
            return False
        end = stop
    return True


def _scalar(value: object) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return INT64[0] <= value <= INT64[1]
    return value is None or isinstance(value, (bool, float, str))


def _in_contract(value: object) -> bool:
    if isinstance(value, list):
        return all(_scalar(v) for v in value)
    if isinstance(value, dict):
        return all(_scalar(v) for v in value.values())
    return _scalar(value)


def names_field(message: str, fields: tuple[str, ...]) -> bool:
    return any(f in message or repr(f)[1:-1] in message for f in fields)


class CaseMaker:
    """Seeded generators of custom_params, from plausible to hostile."""

    def __init__(self, seed: int, vocab: int, max_input: int = 48) -> None:
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.max_input = max_input
        self.kinds: list[tuple[str, int, Callable[[int], dict]]] = [
            ("none", 3, self.none),
            ("unrelated", 6, self.unrelated),
            ("outside", 4, self.outside),
            ("mode", 8, self.mode),
            ("agent", 8, self.agent),
            ("spans-valid", 12, self.spans_valid),
            ("spans-bad", 20, self.spans_bad),
            ("text", 8, self.text),
            ("unknown-key", 8, self.unknown_key),
            ("combo", 15, self.combo),
            ("huge", 3, self.huge),
            ("not-object", 3, self.not_object),
        ]

    def cases(self, count: int, max_new_tokens: int = 2) -> list[Case]:
        names, weights, makers = zip(*self.kinds, strict=True)
        out = []
        for i in range(count):
            k = self.rng.choices(range(len(names)), weights)[0]
            n = self.rng.randint(8, self.max_input)
            body = makers[k](n)
            if "text" not in body:
                body.setdefault("input_ids", self.ids(n))
            sampling = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
            if "custom_params" in body:
                sampling["custom_params"] = body.pop("custom_params")
            body["sampling_params"] = sampling
            verdict, fields = oracle(body)
            out.append(Case(i, names[k], body, verdict, fields))
        return out

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(1000, self.vocab) for _ in range(n)]

    def junk(self, depth: int = 0) -> object:
        """A random JSON value: scalars of every type and size, lists, objects, nesting."""
        r = self.rng
        pick = r.randrange(12 if depth < 2 else 8)
        if pick == 0:
            return r.choice([0, 1, -1, 7, 2**31, 2**63 - 1, -(2**63), 2**64, 10**30])
        if pick == 1:
            return r.choice([0.0, 0.5, -1.5, 1e-300, 1e308, 3.0])
        if pick == 2:
            return r.choice([True, False, None])
        if pick in (3, 4):
            return self.word()
        if pick == 5:
            return r.choice(["", " ", "approx", "exact", "off", "\u00e9\u4e2d\U0001f600", "\x00"])
        if pick == 6:
            return [self.junk(8) for _ in range(r.randrange(5))]  # depth 8: scalars only
        if pick == 7:
            return {self.word(): self.junk(8) for _ in range(r.randrange(4))}
        if pick in (8, 9):
            return [self.junk(depth + 1) for _ in range(r.randrange(1, 4))]
        return {self.word(): self.junk(depth + 1) for _ in range(r.randrange(1, 4))}

    def word(self, n: int | None = None) -> str:
        alphabet = string.ascii_letters + string.digits + "_-. \u00e9\u00df\u4e2d"
        return "".join(self.rng.choice(alphabet) for _ in range(n or self.rng.randrange(1, 12)))

    def valid_spans(self, n: int) -> list[int]:
        """Ordered disjoint pairs within n, some adjacent (end == next start)."""
        k = self.rng.randrange(0, min(4, n // 2) + 1)
        points = sorted(self.rng.sample(range(n + 1), 2 * k))
        spans = []
        for i in range(k):
            start, end = points[2 * i], points[2 * i + 1]
            if spans and self.rng.random() < 0.3:
                start = spans[-1]  # adjacent to the previous span
            spans += [start, end]
        return spans

    def bad_spans(self, n: int) -> object:
        r = self.rng
        spans = self.valid_spans(n) or [0, max(1, n // 2)]
        i = 2 * r.randrange(len(spans) // 2)
        how = r.randrange(14)
        if how == 0:  # reversed pair
            spans[i], spans[i + 1] = spans[i + 1], spans[i]
        elif how == 1:  # empty pair
            spans[i + 1] = spans[i]
        elif how == 2:  # overlapping the next pair
            spans += [spans[-1] - 1, spans[-1] + 1]
        elif how == 3:  # pairs out of order
            spans = spans[-2:] + spans[:-2] + [0, 1]
        elif how == 4:  # past the end of input_ids
            spans[-1] = n + r.choice([1, 2, 1000, 2**31, 2**63, 10**30])
        elif how == 5:  # negative
            spans[i] = r.choice([-1, -(2**31), -(2**63)])
        elif how == 6:  # odd length
            spans = spans[:-1] if r.random() < 0.5 else spans + [n]
        elif how == 7:  # floats
            spans[i] = r.choice([spans[i] + 0.5, float(spans[i])])
        elif how == 8:  # booleans
            spans[i] = r.choice([True, False])
        elif how == 9:  # strings
            spans[i] = str(spans[i])
        elif how == 10:  # null element
            spans[i] = None
        elif how == 11:  # nested pairs
            return [spans[j : j + 2] for j in range(0, len(spans), 2)]
        elif how == 12:  # not a list
            return r.choice([5, "0,4", {"0": 4}, None, True, ""])
        else:  # a duplicate pair
            spans += spans[i : i + 2]
        return spans

    def none(self, n: int) -> dict:
        return {"custom_params": None} if self.rng.random() < 0.5 else {}

    def unrelated(self, n: int) -> dict:
        custom = {self.word(): self.junk(8) for _ in range(self.rng.randrange(1, 5))}
        if self.rng.random() < 0.3:  # near misses of the prefix are not kvcomm keys
            custom[
                self.rng.choice(
                    [
                        "KVCOMM_mode",
                        "kvcomm",
                        "kvcommspans",
                        "_kvcomm_mode",
                        " kvcomm_mode",
                        "Kvcomm_agent",
                    ]
                )
            ] = self.junk(8)
        return {"custom_params": custom}

    def outside(self, n: int) -> dict:
        custom = {
            self.word(): self.rng.choice(
                [{"a": {"b": 1}}, [[1, 2]], [{"x": 1}], 2**64, -(2**70), {"k": [1, 2]}]
            )
        }
        return {"custom_params": custom}

    def mode(self, n: int) -> dict:
        value = self.rng.choice(
            [
                *MODES,
                *MODES,
                "APPROX",
                "Exact",
                "approx ",
                "",
                "fast",
                "dense",
                None,
                0,
                1,
                True,
                ["approx"],
                {"mode": "approx"},
            ]
        )
        return {"custom_params": {"kvcomm_mode": value}}

    def agent(self, n: int) -> dict:
        r = self.rng
        value = r.choice(
            [
                self.word(),
                "",
                self.word(MAX_AGENT),
                self.word(MAX_AGENT + 1),
                "\U0001f600" * MAX_AGENT,
                "\U0001f600" * (MAX_AGENT + 1),
                None,
                3,
                False,
                ["solver"],
                {"name": "solver"},
                "a\nb\x00c",
            ]
        )
        return {"custom_params": {"kvcomm_agent": value}}

    def spans_valid(self, n: int) -> dict:
        custom = {"kvcomm_spans": self.valid_spans(n)}
        if self.rng.random() < 0.5:
            custom["kvcomm_mode"] = self.rng.choice(MODES)
        return {"custom_params": custom}

    def spans_bad(self, n: int) -> dict:
        return {"custom_params": {"kvcomm_spans": self.bad_spans(n)}}

    def text(self, n: int) -> dict:
        custom = {"kvcomm_spans": self.rng.choice([[], [0, 1], self.valid_spans(n)])}
        if self.rng.random() < 0.5:
            custom["kvcomm_mode"] = self.rng.choice(MODES)
        words = " ".join(self.word() for _ in range(n // 3 + 1))
        return {"text": words, "custom_params": custom}

    def unknown_key(self, n: int) -> dict:
        key = self.rng.choice(
            [
                "kvcomm_span",
                "kvcomm_modes",
                "kvcomm_",
                "kvcomm_MODE",
                "kvcomm_agent_",
                "kvcomm_spans ",
                "kvcomm_\u00e9",
                "kvcomm_" + self.word(),
            ]
        )
        custom = {key: self.junk(8)}
        if self.rng.random() < 0.5:
            custom["kvcomm_mode"] = "approx"
        return {"custom_params": custom}

    def combo(self, n: int) -> dict:
        r, custom = self.rng, {}
        if r.random() < 0.7:
            custom.update(self.mode(n)["custom_params"])
        if r.random() < 0.7:
            custom.update(self.agent(n)["custom_params"])
        if r.random() < 0.8:
            custom["kvcomm_spans"] = self.valid_spans(n) if r.random() < 0.5 else self.bad_spans(n)
        if r.random() < 0.2:
            custom.update(self.unknown_key(n)["custom_params"])
        if r.random() < 0.4:
            custom.update(self.unrelated(n)["custom_params"])
        body = {"custom_params": custom}
        if r.random() < 0.15:
            body["text"] = " ".join(self.word() for _ in range(n // 3 + 1))
        return body

    def huge(self, n: int) -> dict:
        r = self.rng
        how = r.randrange(6)
        if how == 0:  # a valid prompt cut into many adjacent 1-2 token spans
            n = max(self.max_input * 4, 64)
            spans, at = [], 0
            while at + 2 <= n:
                step = r.choice([1, 2])
                spans += [at, at + step]
                at += step
            return {"input_ids": self.ids(n), "custom_params": {"kvcomm_spans": spans}}
        if how == 1:  # 20000 ordered values, the last past the end
            return {"custom_params": {"kvcomm_spans": list(range(19_999)) + [10**9]}}
        if how == 2:
            return {"custom_params": {"kvcomm_agent": "x" * 100_000}}
        if how == 3:
            return {"custom_params": {"note": "y" * 200_000, "kvcomm_mode": "approx"}}
        if how == 4:
            return {"custom_params": {f"k{i}": i for i in range(2000)}}
        return {"custom_params": {f"kvcomm_k{i}": i for i in range(500)}}

    def not_object(self, n: int) -> dict:
        return {
            "custom_params": self.rng.choice(
                [[1, 2], "kvcomm_mode=approx", 5, True, ["kvcomm_spans", 0, 4]]
            )
        }


# --- fuzz: running and judging -------------------------------------------------------------


def judge(case: Case, plain: Reply, streamed: Reply, tokens: int) -> dict:
    """One case's outcome against its verdict (``ok_*`` fields) and what was seen."""
    row = {
        "case": case.index,
        "kind": case.kind,
        "verdict": case.verdict,
        "fields": list(case.fields),
        "status": plain.status,
        "stream_status": streamed.status,
        "late_error": streamed.status == 200 and streamed.error_event is not None,
        "hang": plain.timed_out or streamed.timed_out,
        "message": plain.message[:300],
        "stream_message": streamed.message[:300],
    }
    if case.verdict == "valid":
        row["ok_served"] = plain.completed(tokens) and streamed.completed(tokens)
        row["report_problem"] = report_problem(case.body, plain) or report_problem(
            case.body, streamed
        )
    elif case.verdict == "malformed":
        row["ok_refused"] = plain.status == 400
        row["ok_stream_refused"] = streamed.status == 400 or row["late_error"]
        row["ok_stream_status"] = streamed.status == 400
        row["names_field"] = [
            names_field(m, case.fields)
            for r, m in ((plain, plain.message), (streamed, streamed.message))
            if r.status == 400 or r.error_event is not None
        ]
    else:
        row["ok_outside"] = all(
            r.completed(tokens) or r.status == 400 or r.error_event is not None
            for r in (plain, streamed)
        )
    return row


def report_problem(body: dict, reply: Reply) -> str | None:
    """What is wrong with the kvcomm report of a served valid request, if anything: present
    exactly when a kvcomm_* key was sent, its agent the one sent, ``off`` and ``exact`` honoured,
    token counts summing to the prompt."""
    if reply.data is None:
        return None  # not served: counted elsewhere
    custom = body["sampling_params"].get("custom_params") or {}
    sent = any(k.startswith(PREFIX) for k in custom)
    meta = reply.data.get("meta_info") or {}
    report = (meta.get("kvcomm") or [None])[0]
    if not sent:
        return "report without kvcomm metadata" if report else None
    if not report:
        return "no report"
    mode = custom.get("kvcomm_mode", "approx")
    want = {"off": "off", "exact": "dense"}.get(mode)
    if want and report.get("decision") != want:
        return f"mode {mode} got decision {report.get('decision')}"
    if report.get("agent") != custom.get("kvcomm_agent"):
        return f"agent {report.get('agent')!r} for {custom.get('kvcomm_agent')!r}"
    if mode != "off":
        parts = ("tokens_exact", "tokens_estimated", "tokens_prefilled")
        if sum(report.get(k) or 0 for k in parts) != meta.get("prompt_tokens"):
            return f"token counts {[report.get(k) for k in parts]} != {meta.get('prompt_tokens')}"
    return None


def fuzz(
    target: Target,
    cases: list[Case],
    *,
    batch: int = 50,
    workers: int = 4,
    timeout_s: float = 60.0,
    time_s: float = 1800.0,
    tokens: int = 2,
) -> Section:
    """Every case plain then streamed, ``batch`` cases at a time on ``workers`` threads, the
    server's health checked after each batch; stops at a dead server or after ``time_s``."""
    deadline = time.monotonic() + time_s
    rows: list[dict] = []
    dead_batches, batches = 0, 0
    local = threading.local()

    def one(case: Case) -> dict:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        plain = generate(local.session, target.url, case.body, timeout_s)
        streamed = generate(local.session, target.url, {**case.body, "stream": True}, timeout_s)
        return judge(case, plain, streamed, tokens)

    t0 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        for at in range(0, len(cases), batch):
            if time.monotonic() > deadline:
                break
            rows += pool.map(one, cases[at : at + batch])
            batches += 1
            if not healthy(target):
                dead_batches += 1
                break
            if batches % 5 == 0:
                say(f"fuzz: {len(rows)}/{len(cases)} cases in {time.monotonic() - t0:.0f}s")
    elapsed = time.monotonic() - t0
    return fuzz_section(target, cases, rows, batches, dead_batches, elapsed, timeout_s)


def fuzz_section(
    target: Target,
    cases: list[Case],
    rows: list[dict],
    batches: int,
    dead: int,
    elapsed: float,
    timeout_s: float,
) -> Section:
    by = {v: [r for r in rows if r["verdict"] == v] for v in ("valid", "malformed", "outside")}
    mal = by["malformed"]
    named = [n for r in mal for n in r["names_field"]]
    hangs = sum(r["hang"] for r in rows)
    late = sum(r["late_error"] for r in mal)
    reports = [r for r in by["valid"] if r["report_problem"]]
    s = "fuzz"
    checks = [
        Check(
            s,
            "cases run",
            len(cases),
            len(cases) - len(rows),
            f"{len(rows)} cases x 2 (plain, streamed) in {elapsed:.0f}s; "
            f"{len(by['valid'])} valid, {len(mal)} malformed, {len(by['outside'])} outside",
        ),
        Check(s, "server alive after every batch", batches, dead),
        Check(
            s, "no hang (per-request timeout)", 2 * len(rows), hangs, f"timeout {timeout_s:.0f}s"
        ),
        Check(
            s,
            "valid -> 200 with a completion",
            len(by["valid"]),
            sum(not r["ok_served"] for r in by["valid"]),
        ),
        Check(
            s,
            "valid -> consistent kvcomm report",
            len(by["valid"]),
            len(reports),
            "; ".join(sorted({r["report_problem"] for r in reports}))[:200],
        ),
        Check(
            s,
            "malformed -> 400",
            len(mal),
            sum(not r["ok_refused"] for r in mal),
            _statuses(mal, "status"),
        ),
        Check(s, "malformed refusal names the field", len(named), named.count(False)),
        Check(
            s, "streamed malformed refused", len(mal), sum(not r["ok_stream_refused"] for r in mal)
        ),
        Check(
            s,
            "streamed malformed -> 400 before the stream",
            len(mal),
            sum(not r["ok_stream_status"] for r in mal),
            f"{late} got 200 then an error event",
        ),
        Check(
            s,
            "outside SGLang's contract -> 200 or 400",
            len(by["outside"]),
            sum(not r["ok_outside"] for r in by["outside"]),
            _statuses(by["outside"], "status"),
        ),
    ]
    checks += after_checks(s, target, timeout_s)[1:]  # alive is the per-batch check
    unexpected = [r for r in rows if _unexpected(r)]
    return Section(
        checks,
        {
            "kinds": dict(Counter(r["kind"] for r in rows)),
            "unexpected": unexpected[:50],
            "cases": rows,
        },
    )


def _unexpected(row: dict) -> bool:
    """A case that failed a check other than the known late streamed refusal."""
    oks = ("ok_served", "ok_refused", "ok_stream_refused", "ok_outside")
    return bool(
        row["hang"]
        or not all(row.get(k, True) for k in oks)
        or row.get("report_problem")
        or not all(row.get("names_field", ()))
    )


def _statuses(rows: list[dict], key: str) -> str:
    counts = sorted(Counter(str(r[key]) for r in rows).items())
    return ", ".join(f"{n}x HTTP {status}" for status, n in counts)


# --- multi-agent programs ------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A fully connected exchange: agent i reads its prefix, the question and answers 1..i-1."""

    agents: int = 4
    prefix: int = 24
    question: int = 64
    answer: int = 12
    separator: int = 4

    @property
    def longest_prompt(self) -> int:
        n = self.agents - 1
        return self.prefix + self.question + n * self.answer + (n + 2) * self.separator


@dataclass
class Call:
    program: int
    agent: int
    body: dict
    reply: Reply

    @property
    def report(self) -> dict:
        meta = (self.reply.data or {}).get("meta_info") or {}
        return dict((meta.get("kvcomm") or [{}])[0] or {})

    @property
    def ok(self) -> bool:
        return self.reply.completed(self.body["sampling_params"]["max_new_tokens"])


def roles(shape: Shape, seed: int, vocab: int) -> Exchange:
    """The fixed text all programs share (per-agent prefixes, separators): the placeholders
    the anchor pools are keyed by, so programs teach each other's pools."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(1000, vocab) for _ in range(n)]  # noqa: E731
    return Exchange(
        [ids(shape.prefix) for _ in range(shape.agents)],
        [ids(shape.separator) for _ in range(shape.agents + 1)],
    )


def agent_body(ex: Exchange, shape: Shape, agent: int, shared: list[list[int]]) -> dict:
    """Agents answer ``approx``; the last one, a decision agent, runs ``exact``. A response of n
    tokens is decoded as n+1 and the first n quoted (the last sampled token has no KV)."""
    ids, spans = ex.prompt(agent, shared)
    mode = "exact" if agent == shape.agents - 1 else "approx"
    custom = {"kvcomm_mode": mode, "kvcomm_agent": f"agent{agent + 1}", "kvcomm_spans": spans}
    return {
        "input_ids": ids,
        "sampling_params": {
            "max_new_tokens": shape.answer + 1,
            "temperature": 0,
            "ignore_eos": True,
            "custom_params": custom,
        },
    }


def run_program(
    url: str,
    ex: Exchange,
    shape: Shape,
    program: int,
    question: list[int],
    *,
    stream: bool,
    timeout_s: float,
    deadline: float,
) -> list[Call]:
    """One program's agents in turn; a failed call ends it (later agents would quote it)."""
    shared, calls = [question], []
    with requests.Session() as session:
        for agent in range(shape.agents):
            if time.monotonic() > deadline:
                break
            body = {**agent_body(ex, shape, agent, shared), "stream": stream}
            call = Call(program, agent, body, generate(session, url, body, timeout_s))
            calls.append(call)
            if not call.ok:
                break
            shared.append(call.reply.data["output_ids"][: shape.answer])
    return calls


def run_programs(
    url: str,
    ex: Exchange,
    shape: Shape,
    programs: int,
    *,
    warmup: int,
    seed: int,
    vocab: int,
    timeout_s: float,
    time_s: float,
) -> list[Call]:
    """``warmup`` programs one after the other (their dense prefills give every anchor pool
    its two anchors), then ``programs`` at once, every other one streamed."""
    rng = random.Random(seed + 1)
    questions = [
        [rng.randrange(1000, vocab) for _ in range(shape.question)]
        for _ in range(warmup + programs)
    ]
    deadline = time.monotonic() + time_s
    calls: list[Call] = []
    for p in range(warmup):
        calls += run_program(
            url, ex, shape, p, questions[p], stream=False, timeout_s=timeout_s, deadline=deadline
        )
    if programs:
        with ThreadPoolExecutor(programs) as pool:
            futures = [
                pool.submit(
                    run_program,
                    url,
                    ex,
                    shape,
                    p,
                    questions[p],
                    stream=p % 2 == 1,
                    timeout_s=timeout_s,
                    deadline=deadline,
                )
                for p in range(warmup, warmup + programs)
            ]
            for f in futures:
                calls += f.result()
    return calls


def program_checks(
    section: str, calls: list[Call], shape: Shape, programs: int, before: dict, after: dict
) -> tuple[list[Check], dict]:
    expected = programs * shape.agents
    failed = [c for c in calls if not c.ok]
    reports = [c.report for c in calls if c.ok]
    decisions = Counter(r.get("decision") for r in reports)
    delta = {k: after["requests"][k] - before["requests"][k] for k in before["requests"]}
    eligible = decisions["reuse"] + decisions["dense"]
    figure = (
        f"{decisions['reuse']}/{eligible} calls reused (stats: +{delta.get('reuse')} "
        f"reuse, +{delta.get('dense')} dense)"
    )
    errors = Counter((c.reply.status, c.reply.message[:80]) for c in failed)
    checks = [
        Check(
            section,
            "requests served",
            expected,
            expected - len(calls) + len(failed),
            "; ".join(f"{n}x {s} {m}" for (s, m), n in errors.most_common(3)),
        ),
        Check(section, "reuse observed", eligible, int(decisions["reuse"] == 0), figure),
    ]
    details = {
        "decisions": dict(decisions),
        "stats_delta": delta,
        "fallbacks": dict(
            Counter(r.get("reason") for r in reports if r.get("decision") == "dense")
        ),
        "calls": [
            [
                c.program,
                c.agent,
                bool(c.body.get("stream")),
                c.report.get("decision"),
                c.report.get("reason"),
            ]
            for c in calls
        ],
        "retractions": sum(
            ((c.reply.data or {}).get("meta_info") or {}).get("num_retractions") or 0 for c in calls
        ),
        "failed": [
            {
                "program": c.program,
                "agent": c.agent,
                "status": c.reply.status,
                "error": c.reply.message[:300],
            }
            for c in failed[:20]
        ],
    }
    return checks, details


def concurrency(
    target: Target,
    shape: Shape,
    programs: int,
    *,
    warmup: int = 2,
    seed: int = 0,
    vocab: int,
    timeout_s: float = 300.0,
    time_s: float = 900.0,
    settle_s: float = 120.0,
) -> Section:
    """``programs`` multi-agent programs at once on one --kvcomm server."""
    s = "concurrency"
    flush(target.url)
    start, _ = pool_total(target.url)
    before = stats(target.url)
    t0 = time.monotonic()
    calls = run_programs(
        target.url,
        roles(shape, seed, vocab),
        shape,
        programs,
        warmup=warmup,
        seed=seed,
        vocab=vocab,
        timeout_s=timeout_s,
        time_s=time_s,
    )
    elapsed = time.monotonic() - t0
    checks, details = program_checks(s, calls, shape, warmup + programs, before, stats(target.url))
    checks[0].figure = joined(
        f"{warmup} + {programs} concurrent programs in {elapsed:.0f}s", checks[0].figure
    )
    checks += after_checks(s, target, timeout_s)
    leak, settled = leak_check(s, target, start, settle_s)
    return Section([*checks, leak], {**details, "settle": settled, "elapsed_s": elapsed})


# --- disconnects and timeouts --------------------------------------------------------------


def replay_bodies(calls: list[Call], tokens: int) -> list[dict]:
    """Long generations of the programs' prompts, as sent (approx: reuse-eligible), as
    ``exact`` and without metadata; EOS ignored so they run until cut off."""
    bodies = []
    for call in calls:
        if call.agent == 0 or not call.ok:
            continue
        sampling = {**call.body["sampling_params"], "max_new_tokens": tokens}
        custom = sampling.pop("custom_params")
        for variant in (custom, {**custom, "kvcomm_mode": "exact"}, None):
            s = {**sampling, "custom_params": variant} if variant else dict(sampling)
            bodies.append({"input_ids": call.body["input_ids"], "sampling_params": s})
    return bodies


def disconnect(url: str, body: dict, chunks: int, timeout_s: float) -> dict:
    """Open a streamed request, read ``chunks`` data events, then close the socket."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    got, status = 0, None
    try:
        conn.request(
            "POST",
            "/generate",
            json.dumps({**body, "stream": True}),
            {"Content-Type": "application/json"},
        )
        res = conn.getresponse()
        status = res.status
        while status == 200 and got < chunks:
            line = res.readline()
            if not line:
                break
            if line.startswith(b"data:") and line.strip() != b"data: [DONE]":
                got += 1
    except (OSError, http.client.HTTPException) as exc:
        return {"status": status, "chunks": got, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        conn.close()
    return {"status": status, "chunks": got, "error": None}


def disconnects(
    target: Target,
    shape: Shape,
    count: int,
    *,
    workers: int = 4,
    tokens: int = 128,
    warmup: int = 2,
    seed: int = 0,
    vocab: int,
    timeout_s: float = 300.0,
    time_s: float = 600.0,
    settle_s: float = 120.0,
) -> Section:
    """``count`` streamed requests cut after one or two chunks, ``workers`` at a time, on the
    prompts of ``warmup`` programs (their bases and anchors make the approx ones reusable)."""
    s = "disconnects"
    flush(target.url)
    start, _ = pool_total(target.url)
    calls = run_programs(
        target.url,
        roles(shape, seed + 2, vocab),
        shape,
        0,
        warmup=warmup,
        seed=seed + 2,
        vocab=vocab,
        timeout_s=timeout_s,
        time_s=time_s,
    )
    bodies = replay_bodies(calls, tokens)
    deadline = time.monotonic() + time_s

    def one(i: int) -> dict:
        if time.monotonic() > deadline:
            return {"status": None, "chunks": 0, "error": "section time up", "want": 0}
        want = 1 + i % 2
        return {**disconnect(target.url, bodies[i % len(bodies)], want, timeout_s), "want": want}

    results: list[dict] = []
    if bodies:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, range(count)))
    cut = [r for r in results if r["status"] == 200 and r["chunks"] == r["want"] and not r["error"]]
    errors = Counter(f"{r['status']} {r['error']}"[:80] for r in results if r not in cut)
    checks = [
        Check(
            s,
            "streams cut after 1-2 chunks",
            count,
            count - len(cut),
            joined(
                f"{len(bodies)} bodies (approx / exact / plain)",
                ", ".join(f"{n}x {e}" for e, n in errors.most_common(3)),
            ),
        )
    ]
    checks += after_checks(s, target, timeout_s)
    leak, settled = leak_check(s, target, start, settle_s)
    return Section([*checks, leak], {"results": results, "settle": settled})


def client_timeouts(
    target: Target,
    shape: Shape,
    count: int,
    *,
    read_timeout_s: float = 0.5,
    workers: int = 4,
    tokens: int = 256,
    warmup: int = 2,
    seed: int = 0,
    vocab: int,
    timeout_s: float = 300.0,
    settle_s: float = 120.0,
) -> Section:
    """``count`` non-streamed long generations given up by the client after
    ``read_timeout_s``: SGLang finds them disconnected and aborts them."""
    s = "timeouts"
    flush(target.url)
    start, _ = pool_total(target.url)
    calls = run_programs(
        target.url,
        roles(shape, seed + 3, vocab),
        shape,
        0,
        warmup=warmup,
        seed=seed + 3,
        vocab=vocab,
        timeout_s=timeout_s,
        time_s=timeout_s,
    )
    bodies = replay_bodies(calls, tokens) or [
        {
            "input_ids": list(range(1000, 1064)),
            "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True},
        }
    ]

    def one(i: int) -> Reply:
        with requests.Session() as session:
            return generate(session, target.url, bodies[i % len(bodies)], read_timeout_s)

    with ThreadPoolExecutor(workers) as pool:
        replies = list(pool.map(one, range(count)))
    timed_out = sum(r.timed_out for r in replies)
    checks = [
        Check(
            s,
            "client read timeouts",
            count,
            count - timed_out,
            f"read timeout {read_timeout_s}s on {tokens}-token generations",
        )
    ]
    checks += after_checks(s, target, timeout_s)
    leak, settled = leak_check(s, target, start, settle_s)
    return Section([*checks, leak], {"settle": settled})


def queue_timeouts(
    target: Target,
    shape: Shape,
    count: int,
    *,
    queue_timeout_s: float,
    warmup: int = 2,
    seed: int = 0,
    vocab: int,
    timeout_s: float = 300.0,
    settle_s: float = 120.0,
) -> Section:
    """On a server with ``--max-running-requests 1`` and SGLANG_REQ_WAITING_TIMEOUT: a streamed
    blocker runs, ``count`` requests queue behind it and must get SGLang's 503 after the queue
    timeout; then the blocker is cut."""
    s = "timeouts"
    flush(target.url)
    start, _ = pool_total(target.url)
    calls = run_programs(
        target.url,
        roles(shape, seed + 4, vocab),
        shape,
        0,
        warmup=warmup,
        seed=seed + 4,
        vocab=vocab,
        timeout_s=timeout_s,
        time_s=timeout_s,
    )
    bodies = replay_bodies(calls, shape.answer + 1)
    blocker = {
        "input_ids": list(range(2000, 2032)),
        "sampling_params": {"max_new_tokens": 4096, "ignore_eos": True},
    }
    parts = urlsplit(target.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    replies: list[Reply] = []
    try:
        conn.request(
            "POST",
            "/generate",
            json.dumps({**blocker, "stream": True}),
            {"Content-Type": "application/json"},
        )
        res = conn.getresponse()
        running = res.status == 200 and res.readline().startswith(b"data:")  # it decodes

        def one(i: int) -> Reply:
            with requests.Session() as session:
                return generate(session, target.url, bodies[i % len(bodies)], timeout_s)

        if running and bodies:
            with ThreadPoolExecutor(min(count, 16)) as pool:
                replies = list(pool.map(one, range(count)))
    finally:
        conn.close()  # cuts the blocker
    queued_out = [r for r in replies if r.status == 503 and QUEUE_TIMEOUT_MESSAGE in r.message]
    seen = Counter(f"{r.status} {r.message[:60]}" for r in replies)
    checks = [
        Check(
            s,
            "server-side queue timeouts -> 503",
            count,
            count - len(queued_out),
            f"SGLANG_REQ_WAITING_TIMEOUT={queue_timeout_s}s: "
            + ", ".join(f"{n}x {k}" for k, n in seen.most_common(3)),
        )
    ]
    checks += after_checks(s, target, timeout_s)
    leak, settled = leak_check(s, target, start, settle_s)
    leak.what = "queue server: " + leak.what
    return Section([*checks, leak], {"settle": settled, "replies": dict(seen)})


# --- tiny pool -----------------------------------------------------------------------------


def tiny_pool(
    kvcomm: Target,
    stock: Target,
    shape: Shape,
    programs: int,
    *,
    compare: int,
    warmup: int = 2,
    seed: int = 0,
    vocab: int,
    compare_tokens: int = 8,
    timeout_s: float = 300.0,
    time_s: float = 900.0,
    settle_s: float = 120.0,
) -> Section:
    """Both servers run a pool of ~2x the longest prompt with chunked prefill.

    A: ``programs`` concurrent programs (after ``warmup`` ones) on the kvcomm server: no
    crash, no leak. B: ``compare`` programs one call at a time, identically on both servers: the
    kvcomm server answers each agent in its mode (the stock server gets the same call when it was
    prefilled densely, so both radix trees hold the same exact KV), then, from the second agent
    on (the first has nothing to reuse), the prompt goes to both as ``exact`` and as plain,
    greedy with logprobs; outputs must be bit-identical."""
    s = "tinypool"
    for url in (kvcomm.url, stock.url):
        flush(url)
    start, _ = pool_total(kvcomm.url)
    before = stats(kvcomm.url)
    t0 = time.monotonic()
    ex = roles(shape, seed + 5, vocab)
    calls = run_programs(
        kvcomm.url,
        ex,
        shape,
        programs,
        warmup=warmup,
        seed=seed + 5,
        vocab=vocab,
        timeout_s=timeout_s,
        time_s=time_s,
    )
    checks, details = program_checks(s, calls, shape, warmup + programs, before, stats(kvcomm.url))
    checks[0].figure = joined(
        f"{warmup} + {programs} concurrent programs in {time.monotonic() - t0:.0f}s, "
        f"{details['retractions']} retractions",
        checks[0].figure,
    )
    checks.append(Check(s, "no scheduler crash", 1, int(not healthy(kvcomm))))
    leak, settled = leak_check(s, kvcomm, start, settle_s)
    leak.what = "after concurrent traffic: " + leak.what
    checks.append(leak)

    for url in (kvcomm.url, stock.url):
        flush(url)
    compared = compare_programs(
        kvcomm.url,
        stock.url,
        ex,
        shape,
        compare,
        seed=seed + 6,
        vocab=vocab,
        tokens=compare_tokens,
        timeout_s=timeout_s,
    )
    mism = [c for c in compared if not c["identical"]]
    approx = [c for c in compared if c["mode"] == "exact" and c["approx_mode"] == "approx"]
    reused = sum(c["approx_decision"] == "reuse" for c in approx)
    a_reused, a_eligible = details["decisions"].get("reuse", 0), checks[1].count
    checks[1] = Check(
        s,
        "reuse observed",
        a_eligible + len(approx),
        int(a_reused + reused == 0),
        f"{a_reused}/{a_eligible} calls reused under concurrent traffic, {reused}/{len(approx)} "
        "approx calls in the comparison",
    )
    checks.append(
        Check(
            s,
            "exact and plain bit-identical to stock",
            len(compared),
            len(mism),
            f"{len(compared)} comparisons over {compare} programs, {2 * reused} after a "
            f"reused approx call of the same prompt; cached_tokens differ in "
            f"{sum(not c['same_cached'] for c in compared)}",
        )
    )
    checks += after_checks(s, kvcomm, timeout_s)
    leak2, settled2 = leak_check(s, kvcomm, start, settle_s)
    leak2.what = "after the comparisons: " + leak2.what
    checks.append(leak2)
    return Section(checks, {**details, "settle": [settled, settled2], "compared": compared})


def compare_programs(
    kvcomm: str,
    stock: str,
    ex: Exchange,
    shape: Shape,
    programs: int,
    *,
    seed: int,
    vocab: int,
    tokens: int,
    timeout_s: float,
) -> list[dict]:
    """The programs in lockstep (agent 1 of every program, then agent 2, ...): an agent's
    prefix was cached by the previous program's same agent, so in a tiny pool it is still there
    and the approx call can reuse."""
    rng = random.Random(seed)
    shared = [
        [[rng.randrange(1000, vocab) for _ in range(shape.question)]] for _ in range(programs)
    ]
    out = []
    with requests.Session() as session:
        for agent in range(shape.agents):
            for p in range(programs):
                if len(shared[p]) <= agent:
                    continue  # an earlier agent of this program failed
                body = agent_body(ex, shape, agent, shared[p])
                first = Call(p, agent, body, generate(session, kvcomm, body, timeout_s))
                decision = first.report.get("decision")
                if decision != "reuse":
                    generate(session, stock, body, timeout_s)  # the same tree insertion
                for mode in ("exact", None) if agent else ():
                    probe = _probe_body(body, mode, tokens)
                    a, b = (generate(session, u, probe, timeout_s) for u in (kvcomm, stock))
                    same_cached = _meta(a).get("cached_tokens") == _meta(b).get("cached_tokens")
                    out.append(
                        {
                            "program": p,
                            "agent": agent,
                            "mode": mode or "plain",
                            "approx_mode": body["sampling_params"]["custom_params"]["kvcomm_mode"],
                            "approx_decision": decision,
                            "approx_reason": first.report.get("reason"),
                            "identical": _identical(a, b),
                            "same_cached": same_cached,
                        }
                    )
                if first.ok:
                    shared[p].append(first.reply.data["output_ids"][: shape.answer])
    return out


def _probe_body(body: dict, mode: str | None, tokens: int) -> dict:
    sampling = {**body["sampling_params"], "max_new_tokens": tokens}
    if mode is None:
        sampling.pop("custom_params")
    else:
        sampling["custom_params"] = {**sampling["custom_params"], "kvcomm_mode": mode}
    return {"input_ids": body["input_ids"], "sampling_params": sampling, "return_logprob": True}


def _meta(reply: Reply) -> dict:
    return (reply.data or {}).get("meta_info") or {}


def _identical(a: Reply, b: Reply) -> bool:
    if a.status != 200 or b.status != 200:
        return False
    return (
        a.data["output_ids"] == b.data["output_ids"]
        and _meta(a)["output_token_logprobs"] == _meta(b)["output_token_logprobs"]
    )


# --- servers and the command line ----------------------------------------------------------


def log_check(name: str, path: Path | None) -> Check:
    """SGLang's idle check warns of leaked slots; the extension's safety net of freed ones."""
    text = path.read_text(errors="replace") if path and path.exists() else ""
    leaks = text.count("memory leak detected")
    freed = text.count("freed the estimated KV")
    return Check(
        "logs",
        f"{name}: no SGLang leak warning",
        1,
        int(leaks > 0),
        f"{leaks} leak warnings, {freed} safety-net frees, {text.count('Traceback')} tracebacks",
    )


@contextmanager
def running(servers: dict[str, ServerProcess], results: list[Check]) -> Iterator[bool]:
    """Start the servers side by side; a failed start becomes a failed check. Their logs are
    checked after they stop."""
    try:
        with serving(*servers.values()):
            yield True
    except ServerStartError as exc:
        results.append(Check("servers", f"start {', '.join(servers)}", 1, 1, str(exc)[-300:]))
        yield False
    finally:
        for name, server in servers.items():
            results.append(log_check(name, server.log_path))


def vocab_size(model: Path) -> int:
    return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    a("--model", default="smollm2", choices=sorted(MODELS), help="packaged model to serve")
    a("--seed", type=int, default=0, help="seed of every random choice (cases, prompts)")
    a("--out", default="benchmarks/out/stress", help="folder for stress.json and server logs")
    a(
        "--kvcomm-flags",
        default="",
        help="extra flags for the --kvcomm servers, e.g. '--kvcomm-threshold 0.5'",
    )
    a("--request-timeout-s", type=float, default=300.0, help="client timeout of one request")
    a("--section-time-s", type=float, default=900.0, help="time bound of each section's loop")
    a(
        "--settle-s",
        type=float,
        default=120.0,
        help="how long to wait for the pool to come back after a section (aborts are async)",
    )
    g = p.add_argument_group("fuzz")
    g.add_argument("--fuzz-cases", type=int, default=1000, help="cases (each plain and streamed)")
    g.add_argument("--fuzz-batch", type=int, default=50, help="cases between health checks")
    g.add_argument("--fuzz-workers", type=int, default=4, help="cases in flight at once")
    g.add_argument(
        "--fuzz-timeout-s",
        type=float,
        default=60.0,
        help="per-request timeout: a case taking longer is a hang",
    )
    g = p.add_argument_group("programs (concurrency, disconnects, timeouts, tinypool)")
    g.add_argument("--programs", type=int, default=64, help="concurrent programs")
    g.add_argument("--agents", type=int, default=4, help="agents per program (last one exact)")
    g.add_argument("--prefix", type=int, default=24, help="tokens of each agent's fixed prefix")
    g.add_argument("--question", type=int, default=64, help="tokens of the shared question")
    g.add_argument("--answer", type=int, default=12, help="tokens of each quoted answer")
    g = p.add_argument_group("disconnects and timeouts")
    g.add_argument("--disconnects", type=int, default=50, help="streams cut after 1-2 chunks")
    g.add_argument("--disconnect-workers", type=int, default=4, help="disconnects in flight")
    g.add_argument(
        "--long-tokens",
        type=int,
        default=256,
        help="max_new_tokens of the generations that get cut or time out",
    )
    g.add_argument("--timeouts", type=int, default=50, help="client-side read timeouts")
    g.add_argument("--client-timeout-s", type=float, default=0.5, help="their read timeout")
    g.add_argument(
        "--queue-timeouts",
        type=int,
        default=50,
        help="server-side queue timeouts (0: no queue server)",
    )
    g.add_argument(
        "--queue-timeout-s",
        type=float,
        default=1.0,
        help="SGLANG_REQ_WAITING_TIMEOUT of the queue server",
    )
    g = p.add_argument_group("tinypool")
    g.add_argument("--tiny-programs", type=int, default=16, help="concurrent programs")
    g.add_argument(
        "--tiny-compare",
        type=int,
        default=6,
        help="programs replayed call by call for the bit-identity comparison",
    )
    g.add_argument(
        "--tiny-pool-tokens",
        type=int,
        default=0,
        help="--max-total-tokens of both servers (0: 2x the longest prompt)",
    )
    g.add_argument("--chunked-prefill-size", type=int, default=64, help="of both servers")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown sections {unknown}; known: {list(SECTIONS)}")
    return args


def main_stage(
    args: argparse.Namespace, model: Path, shape: Shape, vocab: int, log: list[Check]
) -> dict[str, Section]:
    """fuzz, concurrency, disconnects, client timeouts on one --kvcomm server; queue timeouts
    on a second one (``--max-running-requests 1``, SGLANG_REQ_WAITING_TIMEOUT)."""
    wanted, out = set(args.sections), Path(args.out)
    kvcomm_args = ["--kvcomm", *shlex.split(args.kvcomm_flags)]
    common = {
        "timeout_s": args.request_timeout_s,
        "seed": args.seed,
        "vocab": vocab,
        "settle_s": args.settle_s,
    }
    servers: dict[str, ServerProcess] = {
        "kvcomm": ServerProcess(model, kvcomm_args, log_path=out / "kvcomm.log", progress=say)
    }
    if "timeouts" in wanted and args.queue_timeouts:
        servers["queue"] = EnvServer(
            model,
            [*kvcomm_args, "--max-running-requests", "1"],
            log_path=out / "queue.log",
            env={"SGLANG_REQ_WAITING_TIMEOUT": str(args.queue_timeout_s)},
            progress=say,
        )
    sections: dict[str, Section] = {}
    say(f"starting {', '.join(servers)} (CPU, {args.model})")
    with running(servers, log) as up:
        if not up:
            return sections
        target = Target.of(servers["kvcomm"])
        if "fuzz" in wanted:
            say(f"fuzz: {args.fuzz_cases} cases")
            cases = CaseMaker(args.seed, vocab).cases(args.fuzz_cases)
            sections["fuzz"] = fuzz(
                target,
                cases,
                batch=args.fuzz_batch,
                workers=args.fuzz_workers,
                timeout_s=args.fuzz_timeout_s,
                time_s=args.section_time_s,
            )
        if "concurrency" in wanted:
            say(f"concurrency: {args.programs} programs of {shape.agents} agents")
            sections["concurrency"] = concurrency(
                target, shape, args.programs, time_s=args.section_time_s, **common
            )
        if "disconnects" in wanted:
            say(f"disconnects: {args.disconnects}")
            sections["disconnects"] = disconnects(
                target,
                shape,
                args.disconnects,
                workers=args.disconnect_workers,
                tokens=args.long_tokens,
                time_s=args.section_time_s,
                **common,
            )
        if "timeouts" in wanted:
            say(f"timeouts: {args.timeouts} client-side, {args.queue_timeouts} queue")
            sec = client_timeouts(
                target,
                shape,
                args.timeouts,
                read_timeout_s=args.client_timeout_s,
                tokens=args.long_tokens,
                **common,
            )
            if "queue" in servers:
                queued = queue_timeouts(
                    Target.of(servers["queue"]),
                    shape,
                    args.queue_timeouts,
                    queue_timeout_s=args.queue_timeout_s,
                    **common,
                )
                sec.checks += queued.checks
                sec.details["queue"] = queued.details
            sections["timeouts"] = sec
    return sections


def tiny_stage(
    args: argparse.Namespace, model: Path, shape: Shape, vocab: int, log: list[Check]
) -> dict[str, Section]:
    """The tiny pool: a --kvcomm and a stock server with the same small pool and chunks."""
    out, pool = Path(args.out), args.tiny_pool_tokens or 2 * shape.longest_prompt
    flags = ["--chunked-prefill-size", str(args.chunked_prefill_size)]
    kvcomm_flags = ["--kvcomm", *shlex.split(args.kvcomm_flags), *flags]
    tiny = {
        "tiny-kvcomm": ServerProcess(
            model,
            kvcomm_flags,
            max_total_tokens=pool,
            log_path=out / "tiny-kvcomm.log",
            progress=say,
        ),
        "tiny-stock": ServerProcess(
            model, flags, max_total_tokens=pool, log_path=out / "tiny-stock.log", progress=say
        ),
    }
    say(
        f"tinypool: --max-total-tokens {pool} (longest prompt {shape.longest_prompt}), "
        f"--chunked-prefill-size {args.chunked_prefill_size}"
    )
    with running(tiny, log) as up:
        if not up:
            return {}
        return {
            "tinypool": tiny_pool(
                Target.of(tiny["tiny-kvcomm"]),
                Target.of(tiny["tiny-stock"]),
                shape,
                args.tiny_programs,
                compare=args.tiny_compare,
                seed=args.seed,
                vocab=vocab,
                timeout_s=args.request_timeout_s,
                time_s=args.section_time_s,
                settle_s=args.settle_s,
            )
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.model)
    vocab = vocab_size(model)
    shape = Shape(args.agents, args.prefix, args.question, args.answer)
    started = time.monotonic()
    log: list[Check] = []  # server start-up and log checks
    sections: dict[str, Section] = {}
    if set(args.sections) - {"tinypool"}:
        sections |= main_stage(args, model, shape, vocab, log)
    if "tinypool" in args.sections:
        sections |= tiny_stage(args, model, shape, vocab, log)

    rows = [c for name in SECTIONS if name in sections for c in sections[name].checks] + log
    print()
    print(
        format_table(
            ["section", "check", "count", "failures", "pass", "figure"],
            [
                [c.section, c.what, c.count, c.failures, "PASS" if c.passed else "FAIL", c.figure]
                for c in rows
            ],
        )
    )
    failed = [c for c in rows if not c.passed]
    elapsed = time.monotonic() - started
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed in {elapsed:.0f}s")
    result = {
        "args": vars(args),
        "shape": asdict(shape),
        "elapsed_s": elapsed,
        "checks": [{**asdict(c), "passed": c.passed} for c in rows],
        "sections": {k: v.details for k, v in sections.items()},
    }
    (out / "stress.json").write_text(json.dumps(result, indent=1, default=str))
    say(f"wrote {out / 'stress.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

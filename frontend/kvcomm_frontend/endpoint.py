"""``KVCommEndpoint``: a ``RuntimeEndpoint`` that sends the kvcomm wire protocol.

It tokenizes each piece of a marked prompt (``markup``) separately, so a shared content has the
same token ids in every prompt that quotes it, and an earlier generation quoted verbatim gets
exactly the token ids the model produced (whose KV the server keeps as base KV). It sends
``input_ids`` with the spans, mode and agent in ``sampling_params.custom_params``; a server
without ``--kvcomm`` ignores them, so the same program and token ids run on the radix-only
baseline. Each call is streamed to measure its time to first token, and recorded for replay.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from sglang.global_config import global_config
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.chat_template import register_chat_template_matching_function
from sglang.utils import http_request
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from kvcomm_frontend.markup import Markup, parse
from sglang_kvcomm.protocol import report_from_meta

_KNOWN_OUTPUTS = 4096  # generations remembered for verbatim quoting


@register_chat_template_matching_function
def _match_smollm(model_path: str) -> str | None:
    # SmolLM2-Instruct speaks ChatML; sglang's matchers only know it by the tinyllama name.
    return "chatml" if re.search(r"smollm", model_path, re.IGNORECASE) else None


def encode_prompt(
    markup: Markup, tokenizer: PreTrainedTokenizerBase, known: Mapping[str, list[int]]
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and the flat [start, end, ...] spans of its shared pieces.

    Pieces are tokenized one by one (so a shared text has the same ids in every prompt); a
    shared piece that is an earlier generation's text takes that generation's ids from
    ``known``."""
    ids: list[int] = []
    spans: list[int] = []
    for n, (text, is_shared) in enumerate(markup.pieces):
        piece = known.get(text) if is_shared else None
        if piece is None:
            piece = tokenizer.encode(text, add_special_tokens=n == 0 and not is_shared)
        if is_shared and piece:
            spans += [len(ids), len(ids) + len(piece)]
        ids += piece
    return ids, spans


@dataclass
class Call:
    """One ``gen`` as sent and answered."""

    agent: str | None
    mode: str
    body: dict  # the /generate request (input_ids, sampling_params with the protocol)
    output_ids: list[int]
    text: str
    meta: dict  # the server's meta_info plus client_ttft_s and client_latency_s

    @property
    def kvcomm(self) -> dict:
        """The server's per-request report ({} from a server without --kvcomm)."""
        return report_from_meta(self.meta)


class KVCommEndpoint(RuntimeEndpoint):
    """``mode``: force every call's mode (e.g. ``"exact"`` for a dense reference run); by
    default each prompt's ``agent(...)`` tag decides, else ``approx``."""

    def __init__(
        self,
        base_url: str,
        *,
        mode: str | None = None,
        tokenizer_path: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(base_url, **kwargs)
        path = tokenizer_path or self.model_info.get("tokenizer_path") or self.get_model_name()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.mode = mode
        self.calls: list[Call] = []
        self._known: OrderedDict[str, list[int]] = OrderedDict()

    def generate(self, s, sampling_params):  # noqa: ANN001, ANN201 (RuntimeEndpoint's signature)
        self._handle_dtype_to_regex(sampling_params)
        markup = parse(s.text_)
        input_ids, spans = encode_prompt(markup, self.tokenizer, self._known)
        mode = self.mode or markup.mode or "approx"
        params = {
            "skip_special_tokens": global_config.skip_special_tokens_in_output,
            "spaces_between_special_tokens": global_config.spaces_between_special_tokens_in_out,
            **sampling_params.to_srt_kwargs(),
        }
        custom = {"kvcomm_mode": mode, "kvcomm_spans": spans}
        if markup.agent:
            custom["kvcomm_agent"] = markup.agent
        params["custom_params"] = {**(params.get("custom_params") or {}), **custom}
        body = {"input_ids": input_ids, "sampling_params": params}
        for item in ("return_logprob", "logprob_start_len", "top_logprobs_num"):
            value = getattr(sampling_params, item, None)
            if value is not None:
                body[item] = value
        call = self._stream(body, markup.agent, mode)
        self.calls.append(call)
        return call.text, call.meta

    def replay(self, call: Call, mode: str) -> Call:
        """Send ``call``'s exact token ids again under another mode (not streamed)."""
        body = copy.deepcopy(call.body)
        body["sampling_params"]["custom_params"]["kvcomm_mode"] = mode
        return self._stream(body, call.agent, mode)

    def _stream(self, body: dict, agent: str | None, mode: str) -> Call:
        started = time.perf_counter()
        res = http_request(
            self.base_url + "/generate",
            json={**body, "stream": True},
            stream=True,
            api_key=self.api_key,
            verify=self.verify,
        )
        self._assert_success(res)
        ttft, last = None, None
        for line in res.iter_lines(decode_unicode=False):
            line = line.decode("utf-8")
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - started
            last = json.loads(line[5:].strip())
        if last is None:
            raise RuntimeError("the server streamed no output")
        meta = dict(last["meta_info"], client_ttft_s=ttft)
        meta["client_latency_s"] = time.perf_counter() - started
        call = Call(agent, mode, body, list(last["output_ids"]), last["text"], meta)
        self._remember(call)
        return call

    def _remember(self, call: Call) -> None:
        """Map the generated text to the ids whose KV the server holds (the stop token, never
        fed back, has none); a stop string leaves ids past the text, so it is not mapped."""
        finish = call.meta.get("finish_reason") or {}
        ids = call.output_ids
        if finish.get("type") == "stop" and isinstance(finish.get("matched"), int):
            ids = ids[:-1] if ids and ids[-1] == finish["matched"] else ids
        elif finish.get("type") != "length":
            return
        self._known[call.text] = ids
        self._known.move_to_end(call.text)
        while len(self._known) > _KNOWN_OUTPUTS:
            self._known.popitem(last=False)

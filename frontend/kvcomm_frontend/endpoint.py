"""A ``RuntimeEndpoint`` that measures each call's time to first token on the client side."""

from __future__ import annotations

import re
import time

from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.chat_template import register_chat_template_matching_function


@register_chat_template_matching_function
def _match_smollm(model_path: str) -> str | None:
    # SmolLM2-Instruct speaks ChatML; sglang's matchers only know it by the tinyllama name.
    return "chatml" if re.search(r"smollm", model_path, re.IGNORECASE) else None


class TimedEndpoint(RuntimeEndpoint):
    """Streams every ``gen`` call so that its TTFT can be measured as a user sees it.

    The returned ``meta_info`` is the server's final one plus ``client_ttft_s`` (request sent to
    first streamed token) and ``client_latency_s`` (request sent to last token).
    """

    def generate(self, s, sampling_params):  # noqa: ANN001, ANN201 (RuntimeEndpoint's signature)
        started = time.perf_counter()
        ttft = None
        pieces: list[str] = []
        last_meta: dict = {}
        for chunk, meta in self.generate_stream(s, sampling_params):
            if ttft is None:
                ttft = time.perf_counter() - started
            pieces.append(chunk)
            last_meta = meta
        meta_info = dict(last_meta)
        meta_info["client_ttft_s"] = ttft
        meta_info["client_latency_s"] = time.perf_counter() - started
        return "".join(pieces), meta_info

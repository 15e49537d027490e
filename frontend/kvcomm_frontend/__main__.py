"""Run the fully connected math program against any SGLang server.

python -m kvcomm_frontend --url http://127.0.0.1:30000 --question "What is 2 + 3 * 4?"
"""

from __future__ import annotations

import argparse
import json

from kvcomm_frontend.agents import fully_connected
from kvcomm_frontend.endpoint import KVCommEndpoint
from sglang_kvcomm.protocol import report_from_meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fully connected multi-agent math program.")
    parser.add_argument("--url", required=True, help="base URL of an SGLang server")
    parser.add_argument("--question", required=True, help="the problem the agents solve")
    parser.add_argument("--max-tokens", type=int, default=96, help="answer length per agent")
    parser.add_argument(
        "--chat-template",
        default=None,
        help="sglang chat template name (default: matched from the model path)",
    )
    args = parser.parse_args(argv)
    backend = KVCommEndpoint(args.url, chat_template_name=args.chat_template)
    state = fully_connected.run(question=args.question, max_tokens=args.max_tokens, backend=backend)
    for record in state.ret_value:
        meta = record["meta"]
        print(
            json.dumps(
                {
                    "agent": record["agent"],
                    "answer": record["answer"],
                    "prompt_tokens": meta["prompt_tokens"],
                    "cached_tokens": meta["cached_tokens"],
                    "ttft_s": meta["client_ttft_s"],
                    "kvcomm": report_from_meta(meta) or None,
                }
            )
        )


if __name__ == "__main__":
    main()

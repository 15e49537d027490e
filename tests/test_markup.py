"""Prompt marks and piecewise tokenization on the client side (real SmolLM2 tokenizer)."""

from __future__ import annotations

import pytest

from kvcomm_frontend.endpoint import encode_prompt
from kvcomm_frontend.markup import MarkupError, agent, parse, shared, strip


def test_parse_splits_fixed_and_shared_pieces_and_reads_the_tag():
    text = agent("Solver", "exact") + "System.\nQ: " + shared("2+2?") + "\nA: " + shared("4")
    markup = parse(text)
    assert markup.pieces == (("System.\nQ: ", False), ("2+2?", True), ("\nA: ", False), ("4", True))
    assert (markup.agent, markup.mode) == ("Solver", "exact")
    assert strip(text) == "System.\nQ: 2+2?\nA: 4"
    assert parse("plain text").pieces == (("plain text", False),)


@pytest.mark.parametrize(
    "bad", [lambda: shared(shared("x")), lambda: agent("a", "fast"), lambda: parse("a\ue000b")]
)
def test_bad_markup_is_refused(bad):
    with pytest.raises(MarkupError):
        bad()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_shared_text_gets_the_same_ids_behind_any_prefix(tokenizer):
    question = "Janet has 16 ducks. How many eggs?"
    prompts = [
        parse(prefix + shared(question) + "\nAnswer:")
        for prefix in ("You are a solver. Problem:", "Inspector here; problem")
    ]
    encoded = [encode_prompt(m, tokenizer, {}) for m in prompts]
    quoted = [ids[s:e] for ids, (s, e) in encoded]
    assert quoted[0] == quoted[1] == tokenizer.encode(question, add_special_tokens=False)
    for (ids, _), markup in zip(encoded, prompts, strict=True):
        assert tokenizer.decode(ids) == markup.text


def test_a_quoted_generation_keeps_the_ids_the_model_produced(tokenizer):
    generated = " The answer is 4."
    produced = tokenizer.encode(generated, add_special_tokens=False)[::-1]  # any ids: used as-is
    ids, spans = encode_prompt(
        parse("Q " + shared(generated) + " ok"), tokenizer, {generated: produced}
    )
    assert ids[spans[0] : spans[1]] == produced

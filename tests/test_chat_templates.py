"""The chat template Corral writes for instruction formats renders exactly what Corral itself
prompts with, through the same Jinja machinery servers use (`tokenizer.apply_chat_template`)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.templates import alpaca_template, dolly_template, guanaco_template, vicuna_template

TEMPLATES = {
    "alpaca": alpaca_template("<|im_end|>"),
    "dolly": dolly_template(),
    "vicuna": vicuna_template("<|im_end|>"),
    "guanaco": guanaco_template("<|im_end|>"),
}

text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=40
)
turn = st.tuples(st.sampled_from(["user", "assistant", "system", "developer"]), text)


def conversations():
    """Any mix of roles and texts (braces, quotes, markers, unicode), ending with a user turn."""
    return st.lists(turn, max_size=6).flatmap(
        lambda turns: text.map(
            lambda last: (
                [{"role": r, "content": c} for r, c in turns] + [{"role": "user", "content": last}]
            )
        )
    )


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer):
    return copy.deepcopy(embedded_tokenizer)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@settings(max_examples=150, deadline=None)
@given(messages=conversations())
def test_jinja_template_renders_what_corral_prompts_with(tokenizer, name, messages):
    template = TEMPLATES[name]
    tokenizer.chat_template = template.jinja_chat_template()
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == template.format_conversation(messages)


def test_a_single_question_is_the_single_turn_prompt(tokenizer):
    template = TEMPLATES["dolly"]
    tokenizer.chat_template = template.jinja_chat_template()
    messages = [{"role": "user", "content": 'Say "{input}" twice.'}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == template.format_prompt('Say "{input}" twice.')
    assert rendered.endswith("### Response:\n")


def test_bos_is_written_for_tokenizers_that_add_it(tokenizer):
    tokenizer.chat_template = TEMPLATES["alpaca"].jinja_chat_template(bos_token=True)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith(tokenizer.bos_token + "Below is an instruction")


def test_chat_needs_no_second_template():
    from corral.templates import PromptTemplate

    chat = PromptTemplate(name="chat", response_marker="x", end_marker="y", completion_suffix="y")
    with pytest.raises(ValueError, match="already"):
        chat.jinja_chat_template()

"""Prompt templates: each format's exact text, and its markers found where they belong."""

from __future__ import annotations

import pytest

from corral.templates import TEMPLATE_NAMES, get_template


def test_alpaca_with_input_text():
    template = get_template("alpaca", eos_token="</s>")
    prompt, completion = template.format_example("Sum them.", "1 2", "3")
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum them.\n\n### Input:\n1 2\n\n### Response:\n"
    )
    assert completion == "3</s>"


def test_alpaca_without_input_text():
    template = get_template("alpaca", eos_token="<|im_end|>")
    assert template.format_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert template.end_marker == "<|im_end|>"
    assert template.format_completion("hi") == "hi<|im_end|>"


def test_dolly_text_and_end_marker():
    template = get_template("dolly")
    prompt, completion = template.format_example("Summarize.", "Long text.", "Short.")
    assert prompt.endswith("### Instruction:\nSummarize.\n\nInput:\nLong text.\n\n### Response:\n")
    assert completion == "Short.\n\n### End"
    assert template.end_marker == "### End"
    assert "Input:" not in template.format_prompt("Summarize.")


def test_user_text_with_braces_and_markers_is_kept_verbatim():
    template = get_template("dolly")
    instruction = "Explain {input} and ### Response: in {braces}"
    assert f"### Instruction:\n{instruction}\n\n" in template.format_prompt(instruction)


@pytest.mark.parametrize("name", ["alpaca", "dolly"])
def test_markers_sit_at_prompt_end_and_after_output(name):
    template = get_template(name, eos_token="</s>")
    prompt, completion = template.format_example("Do X.", "", "Answer")
    # The response marker is the last thing in the prompt (plus its newline) ...
    assert prompt.rstrip("\n").endswith(template.response_marker)
    # ... and the full text, split on the markers, gives back exactly the output.
    full = prompt + completion
    after_marker = full[full.rindex(template.response_marker) + len(template.response_marker) :]
    assert after_marker.lstrip("\n").split(template.end_marker)[0].rstrip("\n") == "Answer"


def test_chat_template_from_the_embedded_tokenizer(embedded_tokenizer):
    template = get_template("chat", embedded_tokenizer)
    prompt, completion = template.format_example("Name a fruit.", "Red ones only.", "Apple")
    messages = [{"role": "user", "content": "Name a fruit.\n\nRed ones only."}]
    assert prompt == embedded_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert prompt + completion == embedded_tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "Apple"}], tokenize=False
    ).rstrip("\n")
    assert template.response_marker == "<|im_start|>assistant"
    assert template.end_marker == embedded_tokenizer.eos_token == "<|im_end|>"


def test_alpaca_end_marker_is_the_tokenizer_eos(embedded_tokenizer):
    template = get_template("alpaca", embedded_tokenizer)
    assert template.end_marker == embedded_tokenizer.eos_token
    # The end marker is one token, so generation can stop on it and extraction can find it.
    ids = embedded_tokenizer(template.format_completion("Yes"), add_special_tokens=False).input_ids
    assert ids[-1] == embedded_tokenizer.eos_token_id


def test_unknown_template_and_chat_without_tokenizer():
    with pytest.raises(ValueError, match="unknown template 'mistral'"):
        get_template("mistral")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        get_template("chat")
    assert set(TEMPLATE_NAMES) == {"alpaca", "dolly", "chat", "vicuna", "guanaco"}

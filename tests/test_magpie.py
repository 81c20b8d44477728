"""Magpie mode: the pre-query prefix of real chat templates, the refusals, the filters, and runs
against the fault-injecting test teacher and the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from corral.data_gen import filters, magpie
from corral.data_gen.config import GenerateConfig
from corral.data_gen.methods import MagpieRounds, check_magpie_teacher
from corral.data_gen.pipeline import estimate_generation, generate_dataset
from openai_test_server import OpenAITestServer

from corral.records import read_alpaca

REPO_ROOT = Path(__file__).resolve().parents[1]

# Chat templates in the shape the model families ship (written here for the test).
LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] "
    "+ '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if message.role != 'system' "
    "or not loop.first %}{{- '<|im_start|>' + message.role + '\n' + message.content + "
    "'<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
NO_HEADER = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
LOWERCASES = "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] | lower }}{% endfor %}"


def tokenizer_folder(tmp_path: Path, name: str, template: str | None, **tokens: str) -> Path:
    """A tokenizer folder (the embedded model's vocabulary) with another family's template."""
    from transformers import AutoTokenizer

    from corral.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded"))
    tokenizer.chat_template = template
    for key, value in tokens.items():
        setattr(tokenizer, key, value)
    folder = tmp_path / name
    tokenizer.save_pretrained(folder)
    if template is None:
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def split_of(folder: Path, system_prompt: str = "", turns=()) -> magpie.PreQuery:
    config = GenerateConfig(mode="magpie", model="x", magpie_tokenizer=str(folder),
                            system_prompt=system_prompt)  # fmt: skip
    from corral.data_gen.methods import load_template_tokenizer

    rounds = MagpieRounds(config, load_template_tokenizer(config), endpoint=False)
    return rounds.query_split(list(turns))


def test_the_embedded_models_template_splits_before_the_users_message(embedded_model_path):
    config = GenerateConfig(mode="magpie", model="embedded")
    split = check_magpie_teacher(config)
    assert split.prefix == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\n"
    )
    assert split.stops[0] == "<|im_end|>"
    # A steering system prompt replaces the default one; the prefix still ends at the user header.
    steered = check_magpie_teacher(
        GenerateConfig(mode="magpie", model="embedded", system_prompt="You teach chemistry.")
    )
    assert steered.prefix == (
        "<|im_start|>system\nYou teach chemistry.<|im_end|>\n<|im_start|>user\n"
    )


def test_llama3_mistral_and_qwen_templates_split(tmp_path, embedded_model_path):
    llama = tokenizer_folder(tmp_path, "llama3", LLAMA3, bos_token="<|begin_of_text|>")
    split = split_of(llama, "Answer as a lawyer.")
    assert split.prefix == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer as a lawyer."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert split.stops[0] == "<|eot_id|>"
    second = split_of(llama, "", [{"role": "user", "content": "Q?"},
                                  {"role": "assistant", "content": "A."}])  # fmt: skip
    assert second.prefix.endswith("A.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")

    mistral = tokenizer_folder(tmp_path, "mistral", MISTRAL, bos_token="<s>", eos_token="</s>")
    split = split_of(mistral)
    assert split.prefix == "<s>[INST] " and split.stops[0] == "[/INST]"
    later = split_of(mistral, "", [{"role": "user", "content": "Q?"},
                                   {"role": "assistant", "content": "A."}])  # fmt: skip
    assert later.prefix == "<s>[INST] Q? [/INST]A.</s>[INST] "

    qwen = tokenizer_folder(tmp_path, "qwen", QWEN)
    split = split_of(qwen)
    assert split.prefix == (
        "<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    )
    assert split.stops == ("<|im_end|>", "<|im_end|>\n<|im_start|>assistant")


@pytest.mark.parametrize(
    ("template", "system_prompt", "reason"),
    [
        (None, "", "there is none"),
        (NO_HEADER, "", "puts nothing before the user's message"),
        (LOWERCASES, "", "does not reproduce the user's message verbatim"),
        (MISTRAL, "Be brief.", "refuses the conversation system/user .*run without system_prompt"),
    ],
)
def test_a_template_that_cannot_be_split_is_refused_saying_why(
    tmp_path, embedded_model_path, template, system_prompt, reason
):
    folder = tokenizer_folder(tmp_path, "t", template, bos_token="<s>")
    with pytest.raises(magpie.TemplateSplitError, match=reason):
        split_of(folder, system_prompt)


def test_the_command_refuses_before_any_file_or_request(tmp_path, embedded_model_path):
    folder = tokenizer_folder(tmp_path, "plain", NO_HEADER)
    output = tmp_path / "out" / "m.json"
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli", "generate", "--mode", "magpie", "--base-url",
         "http://127.0.0.1:9/v1", "--output", str(output), f"magpie_tokenizer={folder}"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "puts nothing before the user's message" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not output.parent.exists()


def test_magpie_filters_name_their_reasons():
    checks = magpie.MagpieFilters()
    assert checks.query_drop_reason("How do glaciers carve valleys over time?") is None
    assert checks.query_drop_reason("Write a limerick about a cat who loves rain.") is None
    assert checks.query_drop_reason("I need a packing list for a week of hiking.") is None
    assert checks.query_drop_reason("Sure! Here is a poem about the sea.") == magpie.NOT_A_REQUEST
    assert checks.query_drop_reason("The weather was nice yesterday.") == magpie.NOT_A_REQUEST
    assert (
        checks.query_drop_reason("¿Cuáles son las causas de la erosión costera en el norte?")
        == magpie.OTHER_LANGUAGE
    )
    assert checks.query_drop_reason("Wie kann ich meine Wohnung schnell putzen?") == (
        magpie.OTHER_LANGUAGE
    )
    assert (
        magpie.MagpieFilters(language="").query_drop_reason(
            "Wie kann ich meine Wohnung schnell putzen?"
        )
        is None
    )
    loop = "Tell me about the sea and the sea and the sea and the sea and the sea and the sea"
    assert checks.query_drop_reason(loop) == magpie.REPETITIVE
    assert magpie.repetition_ratio("one two three four five six seven eight") == 0.0
    assert magpie.parse_turn_text(
        " What is 2+2?<|im_end|>\n<|im_start|>assistant", ["<|im_end|>"]
    ) == ("What is 2+2?")


def magpie_config(server: OpenAITestServer, output: Path, **overrides) -> GenerateConfig:
    return GenerateConfig(
        mode="magpie",
        base_url=server.base_url,
        model="canned-teacher",
        magpie_tokenizer="embedded",
        output=str(output),
        concurrency=4,
        backoff_base=0.01,
        **overrides,
    )


def test_magpie_against_a_faulty_endpoint_gives_alpaca_records(tmp_path, embedded_model_path):
    output = tmp_path / "m.json"
    with OpenAITestServer(faults=["429", None, "500", "malformed"], retry_after=0.05) as server:
        config = magpie_config(server, output, num_instructions=24,
                               system_prompt="You answer questions about nature.")  # fmt: skip
        result = generate_dataset(config, progress=False, log=lambda _: None)
        prompts = list(server.prompts)
    records = read_alpaca(output)
    assert len(records) == 24 and len({r["instruction"] for r in records}) == 24
    assert all(r["input"] == "" and r["output"] for r in records)
    # Asked with the template's pre-query prefix alone (raw completions), answered in-template.
    prefix = "<|im_start|>system\nYou answer questions about nature.<|im_end|>\n<|im_start|>user\n"
    assert prefix in prompts
    assert any(p.startswith(prefix) and p.endswith("<|im_start|>assistant\n") for p in prompts)
    # What the filters dropped is counted by reason, and nothing dropped reached the data.
    dropped = result.manifest["counts"]["dropped"]
    assert dropped[magpie.NOT_A_REQUEST] >= 1 and dropped[magpie.OTHER_LANGUAGE] >= 1
    assert dropped[magpie.REPETITIVE] >= 1
    assert not any(r["instruction"].startswith("Sure!") for r in records)
    assert not any("¿" in r["instruction"] for r in records)
    assert result.manifest["retries"] >= 3 and result.manifest["mode"] == "magpie"
    lineage = [json.loads(line) for line in open(tmp_path / "m.lineage.jsonl")]
    assert len(lineage) == 24
    assert lineage[0]["system_prompt"] == "You answer questions about nature."
    assert lineage[0]["teacher"]["api"] == "completions"


def test_magpie_multi_turn_writes_sharegpt(tmp_path, embedded_model_path):
    output = tmp_path / "chat.json"
    with OpenAITestServer() as server:
        generate_dataset(magpie_config(server, output, num_instructions=6, magpie_turns=2),
                         progress=False, log=lambda _: None)  # fmt: skip
    conversations = json.loads(output.read_text())
    assert len(conversations) == 6
    for conversation in conversations:
        turns = conversation["conversations"]
        assert [t["from"] for t in turns] in (["human", "gpt"], ["human", "gpt"] * 2)
    assert any(len(c["conversations"]) == 4 for c in conversations)


def test_magpie_estimate_and_settings_in_the_fingerprint(tmp_path, embedded_model_path):
    with OpenAITestServer() as server:
        config = magpie_config(server, tmp_path / "m.json", num_instructions=50)
        estimate = estimate_generation(config, probes=4)
        assert estimate["mode"] == "magpie" and estimate["probe"]["requests"] >= 4
        assert estimate["requests"] is not None and estimate["requests"] >= 50
        generate_dataset(magpie_config(server, tmp_path / "m.json", num_instructions=4),
                         progress=False, log=lambda _: None)  # fmt: skip
        from corral.data_gen.journal import FingerprintMismatch

        with pytest.raises(FingerprintMismatch, match="system_prompt"):
            generate_dataset(
                magpie_config(server, tmp_path / "m.json", num_instructions=8, system_prompt="x"),
                progress=False,
                log=lambda _: None,
            )


@pytest.mark.long
def test_magpie_with_the_embedded_model_as_local_teacher(tmp_path, embedded_model_path):
    output = tmp_path / "local.json"
    config = GenerateConfig(
        mode="magpie",
        model="embedded",
        output=str(output),
        num_instructions=1,
        local_batch_size=4,
        query_max_tokens=40,
        max_tokens=96,
        temperature=0.8,
        language="",
        max_idle_rounds=8,
    )
    result = generate_dataset(config, progress=False, log=lambda _: None)
    records = read_alpaca(output)
    assert len(records) == 1 and all(r["instruction"] and r["output"] for r in records)
    # The questions are the model's own continuations of the user header, not template text.
    assert not any("<|im_start|>" in r["instruction"] for r in records)
    assert result.manifest["counts"]["candidates"] >= 1
    assert result.manifest["teacher"]["kind"] == "local"
    kept_or_dropped = result.manifest["counts"]["candidates"]
    assert kept_or_dropped >= len(records)
    assert filters.REQUEST_FAILED not in result.manifest["counts"]["dropped"]


def test_an_endpoint_that_adds_bos_itself_gets_the_prefix_without_it(tmp_path, embedded_model_path):
    """vLLM tokenizes a completion prompt with the model's BOS in front, as the tokenizer does:
    a prefix that starts with the BOS text would carry it twice."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from corral.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded"))
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = MISTRAL
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    config = GenerateConfig(mode="magpie", model="x")
    served = MagpieRounds(config, tokenizer, endpoint=True)
    local = MagpieRounds(config, tokenizer, endpoint=False)  # encodes without special tokens
    prefix = served.query_split([]).prefix
    assert prefix == "<s>[INST] "
    assert served._raw(prefix) == "[INST] " and local._raw(prefix) == "<s>[INST] "
    prompt, stops = served.answer_split([{"role": "user", "content": "Why?"}])
    assert prompt == "[INST] Why? [/INST]" and stops == (tokenizer.eos_token,)


def test_cli_estimate_and_a_teacher_without_a_local_tokenizer(
    tmp_path, capsys, embedded_model_path
):
    from corral.cli import main as corral_main

    output = tmp_path / "m.json"
    with OpenAITestServer() as server:
        common = ["generate", "--mode", "magpie", "--base-url", server.base_url, "--output",
                  str(output), "--num-instructions", "40"]  # fmt: skip
        assert corral_main([*common, "--model", "canned-teacher", "--estimate",
                            "magpie_tokenizer=embedded"]) == 0  # fmt: skip
        assert "Estimate for 40 instructions (magpie mode)" in capsys.readouterr().out
        assert json.loads((tmp_path / "m.estimate.json").read_text())["mode"] == "magpie"
        requests = server.stats["requests"]
        # An endpoint model whose tokenizer is not on this machine: refused, naming the fix.
        assert corral_main([*common, "--model", str(tmp_path / "no-such-model")]) == 2
        assert "give magpie_tokenizer=FOLDER" in capsys.readouterr().err
        assert server.stats["requests"] == requests and not output.exists()

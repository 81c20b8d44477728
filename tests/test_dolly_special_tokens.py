"""Dolly's keys as special tokens, as Dolly did it (`template=dolly dolly_special_tokens=true`):
each key is one id; the end key's id is the stop (no stop string) for Corral, merged exports
(generation_config) and GGUF exports (llama.cpp's end-of-turn id); the new embedding rows are
trained and saved with the adapter; answers are cut out by id. The default stays as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from corral.training.config import TrainConfig
from corral.training.data import IGNORE_INDEX, tokenize_record
from servers import corral_serve

from corral.errors import ConfigError
from corral.templates import (
    DOLLY_KEYS,
    dolly_key_ids,
    encode_prompt,
    get_template,
    stop_strings,
    stop_token_ids,
)

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
RECORDS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello there."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
]


@pytest.fixture
def fresh_tokenizer(embedded_model_path):
    """A tokenizer of its own: adding tokens must not touch the session's shared one."""
    from corral.models import load_tokenizer

    return load_tokenizer("embedded")


def test_each_key_is_one_special_id_and_the_end_key_stops_by_id(fresh_tokenizer):
    tokenizer = fresh_tokenizer
    before = len(tokenizer)
    template = get_template("dolly", tokenizer, dolly_special_tokens=True)
    ids = dolly_key_ids(tokenizer)
    assert ids is not None and sorted(ids) == list(range(before, before + 3))
    assert all(key in tokenizer.all_special_tokens for key in DOLLY_KEYS)
    assert stop_strings(tokenizer, template) == ()
    assert ids[2] in stop_token_ids(tokenizer, template)
    example, _ = tokenize_record(RECORDS[0], 0, tokenizer, template, max_length=256)
    prompt = encode_prompt(tokenizer, template, template.format_prompt("Say hello."))
    assert example.input_ids[: len(prompt)] == prompt  # the served prompt, as ever
    assert prompt.count(ids[0]) == 1 and prompt[-2:] == [ids[1], tokenizer("\n").input_ids[0]]
    # The end key is trained, as one token, right after the answer and its blank line.
    assert example.input_ids[-1] == ids[2] and example.labels[-1] == ids[2]
    assert tokenizer.decode(example.input_ids[len(prompt) :]) == "Hello there.\n\n### End"
    assert IGNORE_INDEX not in example.labels[len(prompt) :]


def test_the_default_dolly_template_adds_nothing(fresh_tokenizer):
    before = len(fresh_tokenizer)
    template = get_template("dolly", fresh_tokenizer)
    assert len(fresh_tokenizer) == before and dolly_key_ids(fresh_tokenizer) is None
    assert stop_strings(fresh_tokenizer, template) == ("### End",)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"template": "alpaca"}, "an option of template=dolly"),
        ({"template": "dolly", "method": "dpo"}, "for supervised runs"),
    ],
)
def test_the_option_is_refused_where_it_does_not_apply(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(dolly_special_tokens=True, **overrides)


def test_answers_are_cut_out_by_the_keys_ids(fresh_tokenizer):
    from corral.inference.extraction import ResponseMarkers, extract_response

    tokenizer = fresh_tokenizer
    get_template("dolly", tokenizer, dolly_special_tokens=True)
    _, response, end = dolly_key_ids(tokenizer)
    markers = ResponseMarkers("### Response:", "### End", response, end)
    # "### End" spelled in ordinary tokens is text, not the end: only the id ends the answer.
    spelled = tokenizer.convert_tokens_to_ids(["###", "ĠEnd"])
    answer = tokenizer("Say", add_special_tokens=False).input_ids + spelled
    extracted = extract_response([*answer, end, 5, 6], tokenizer.decode, markers)
    assert extracted.end_marker_found
    assert extracted.text.strip() == "Say### End"


# ---------------------------------------------------------------------------- a run, end to end


@pytest.fixture(scope="module")
def special_run(tmp_path_factory, tiny_model_path) -> Path:
    """A LoRA run on the tiny LLaMA (the embedded tokenizer) with Dolly's keys as special tokens.
    A few steps are enough for the random model to learn the easiest thing in its data: closing
    an answer with the end key, a token its base has never produced."""
    root = tmp_path_factory.mktemp("dolly-special")
    data = root / "data.json"
    data.write_text(json.dumps(RECORDS))
    run = root / "run"
    result = subprocess.run(
        [ACCELERATE, "launch", "train.py", "--config", "configs/training/smoke.yaml",
         "model=tiny-random", f"data={data}", f"output_dir={run}", "report_to=[none]",
         "template=dolly", "dolly_special_tokens=true", "val_size=0", "max_steps=30",
         "micro_batch_size=2", "learning_rate=1e-2", "packing=false", "eval_steps=0",
         "save_steps=0", "lr_scheduler=constant"],
        cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.long
def test_the_run_trains_and_saves_the_new_rows_and_stops_on_the_end_id(special_run):
    import torch
    from corral.inference.generation import answer_instructions, templated_params
    from corral.inference.loading import load_for_inference
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(special_run)
    ids = dolly_key_ids(tokenizer)
    assert ids is not None
    config = json.loads((special_run / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == ids
    saved = load_file(special_run / "adapter_model.safetensors")
    rows = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert rows.shape[0] == 3
    # Trained: the rows moved away from where the base's grown embedding started them.
    start = saved["base_model.model.model.embed_tokens.token_adapter.base_layer.weight"][ids]
    assert not torch.allclose(rows, start)

    loaded = load_for_inference(str(special_run))
    assert loaded.stop_strings() == () and ids[2] in loaded.stop_token_ids()
    assert (loaded.markers.response_marker_id, loaded.markers.end_marker_id) == (ids[1], ids[2])
    assert templated_params(loaded, max_new_tokens=8).stop == ()
    answers = answer_instructions(
        special_run, [r["instruction"] for r in RECORDS], max_new_tokens=8, loaded=loaded
    )
    for answer in answers:
        # Stopped by the id: the end key is the last token generated, with no stop string asked.
        assert answer.finish_reason == "stop" and answer.end_marker_found
        assert answer.raw.endswith("### End") and answer.completion_tokens <= 8
    # And through `corral serve`, asked with no stop: it stops on the id by itself.
    with corral_serve(["--run", str(special_run)], env={"CORRAL_API_KEY": ""}) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
            temperature=0, extra_body={"return_token_ids": True},
        )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["token_ids"][-1] == ids[2]
    assert "### End" not in choice.message.content


@pytest.mark.long
def test_merged_and_gguf_exports_carry_the_keys_and_stop_on_the_end_id(special_run, tmp_path):
    from corral.training.gguf import export_gguf
    from gguf import GGUFReader
    from transformers import AutoTokenizer, GenerationConfig

    merged = tmp_path / "merged"
    out = export_gguf(special_run, tmp_path / "model.gguf", gguf_type="f32", merge_dir=merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = dolly_key_ids(tokenizer)
    assert ids is not None and all(key in tokenizer.all_special_tokens for key in DOLLY_KEYS)
    eos = GenerationConfig.from_pretrained(merged).eos_token_id
    assert ids[2] in eos and tokenizer.eos_token_id in eos
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == len(tokenizer)

    fields = GGUFReader(str(out)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    control = 3  # llama.cpp's CONTROL token type: parsed in prompts, never split
    assert [tokens[i] for i in ids] == list(DOLLY_KEYS) and all(types[i] == control for i in ids)
    assert fields["tokenizer.ggml.eot_token_id"].contents() == ids[2]

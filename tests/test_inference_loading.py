"""Loading a run directory (base + LoRA adapter, or full weights) with the template it recorded,
against the run-directory contract, on run directories built here with peft directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_run_info_for
from corral.inference.generation import answer_instructions
from corral.inference.loading import load_for_inference
from servers import corral_serve

from corral.errors import RunDirError, UsageError


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_run_loads_with_its_recorded_template_and_adapter(lora_run):
    from peft import PeftModel

    from corral.models import load_model

    loaded = load_for_inference(run=lora_run)
    assert loaded.source == "run" and loaded.name == "dolly-lora"
    assert loaded.template.name == "dolly"
    assert loaded.stop_strings() == ("### End",)  # two tokens here, so matched as text
    ids = loaded.tokenizer("### Instruction:\nSay hi")["input_ids"]
    reference = PeftModel.from_pretrained(
        load_model("tiny-random", dtype=torch.float32), str(lora_run)
    )
    base = load_model("tiny-random", dtype=torch.float32)
    merged = _logits(loaded.model, ids)
    assert torch.allclose(merged, _logits(reference, ids), atol=1e-4)
    assert not torch.allclose(merged, _logits(base, ids), atol=1e-3)  # the adapter is applied


def test_unmerged_adapter_gives_the_same_logits_and_answers(lora_run):
    merged = load_for_inference(run=lora_run)
    unmerged = load_for_inference(run=lora_run, merge_adapter=False)  # as for 4-bit bases
    ids = merged.tokenizer("Hello there")["input_ids"]
    assert torch.allclose(_logits(merged.model, ids), _logits(unmerged.model, ids), atol=1e-4)
    questions = ["Name a color.", "Say hi."]
    with_merged = answer_instructions(lora_run, questions, max_new_tokens=4, loaded=merged)
    with_unmerged = answer_instructions(lora_run, questions, max_new_tokens=4, loaded=unmerged)
    assert [a.raw for a in with_merged] == [a.raw for a in with_unmerged]


def test_serving_a_run_with_another_template_is_refused(lora_run):
    with pytest.raises(UsageError, match="trained with template 'dolly'"):
        load_for_inference(run=lora_run, template="alpaca")


def test_full_fine_tune_run_loads_from_its_own_weights(tmp_path, tiny_model_path):
    from corral.models import load_model, load_tokenizer

    run = tmp_path / "full"
    load_model("tiny-random", dtype=torch.float32).save_pretrained(run)
    load_tokenizer("tiny-random").save_pretrained(run)
    write_run_info_for(run, tiny_model_path, "alpaca", method="full")
    loaded = load_for_inference(run=run)
    assert loaded.template.name == "alpaca"
    assert loaded.stop_token_ids() == (loaded.tokenizer.eos_token_id,)


def test_recorded_markers_that_no_longer_match_are_refused(lora_run, tmp_path):
    import shutil

    drifted = tmp_path / "drifted"
    shutil.copytree(lora_run, drifted)
    info = json.loads((drifted / "run_info.json").read_text())
    info["end_marker"] = "### Finish"
    (drifted / "run_info.json").write_text(json.dumps(info))
    with pytest.raises(RunDirError, match="field 'end_marker'"):
        load_for_inference(run=drifted)


def test_model_and_run_are_exclusive(lora_run):
    with pytest.raises(UsageError, match="exactly one"):
        load_for_inference("tiny-random", run=lora_run)


def test_answer_instructions_with_a_run_and_a_base_model(lora_run):
    instructions = ["Name a color.", {"instruction": "Add the numbers.", "input": "2 and 3"}]
    tuned = answer_instructions(lora_run, instructions, max_new_tokens=6)
    base = answer_instructions("tiny-random", instructions, max_new_tokens=6, template="dolly")
    assert [a.instruction for a in tuned] == ["Name a color.", "Add the numbers."]
    assert tuned[1].input == "2 and 3"
    for answer in tuned + base:
        assert answer.completion_tokens <= 6
        assert "### Instruction" not in answer.text  # the prompt is never returned
        assert answer.text == answer.text.strip()
    # The adapter changes what the model writes.
    assert [a.raw for a in tuned] != [a.raw for a in base]


def test_compare_base_and_tuned_uses_the_runs_base_and_template(lora_run):
    from corral.inference.generation import compare_base_and_tuned

    base, tuned = compare_base_and_tuned(lora_run, ["Name a color."], max_new_tokens=5)
    alone = answer_instructions(
        "tiny-random", ["Name a color."], max_new_tokens=5, template="dolly"
    )
    assert base[0].raw == alone[0].raw  # the base, prompted with the run's template
    assert tuned[0].raw != base[0].raw


def test_nf4_quantized_model_generates(tiny_model_path):
    loaded = load_for_inference("tiny-random", quantization="nf4", template="alpaca")
    answers = answer_instructions("tiny-random", ["Say hi."], max_new_tokens=4, loaded=loaded)
    assert answers[0].completion_tokens >= 1
    assert any("4bit" in type(m).__name__ for m in loaded.model.modules())


def test_qlora_style_run_on_a_4bit_base_keeps_the_adapter_unmerged(lora_run):
    from peft import PeftModel

    loaded = load_for_inference(run=lora_run, quantization="nf4")
    assert isinstance(loaded.model, PeftModel)  # merging into 4-bit weights would lose quality
    answers = answer_instructions(lora_run, ["Say hi."], max_new_tokens=3, loaded=loaded)
    assert answers[0].completion_tokens >= 1


@pytest.mark.slow
def test_serve_a_run_answers_with_the_runs_template(lora_run):
    """`corral serve --run` formats chat requests with the template the run recorded (dolly)."""
    import openai

    from corral.models import load_tokenizer
    from corral.templates import get_template

    with corral_serve(["--run", str(lora_run)], env={"CORRAL_API_KEY": ""}, timeout=120) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["dolly-lora"]
        reply = client.chat.completions.create(
            model="dolly-lora",
            messages=[{"role": "user", "content": "Name a color."}],
            max_tokens=4,
            temperature=0,
        )
    tokenizer = load_tokenizer("tiny-random")
    dolly_prompt = get_template("dolly", tokenizer).format_prompt("Name a color.")
    assert reply.usage.prompt_tokens == len(tokenizer(dolly_prompt)["input_ids"])


def test_every_serve_config_loads():
    from corral.inference.serve_config import ServeConfig

    from corral.config import load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs" / "serve").glob("*.yaml"))
    assert configs
    for path in configs:
        config = load_config(ServeConfig, path)
        assert config.max_batch_size >= 1
        assert (
            path.read_text().startswith("# ") and "corral serve" in path.read_text().splitlines()[0]
        )


def test_bf16_weights_generate_on_cpu(tiny_model_path):
    loaded = load_for_inference("tiny-random", template="alpaca", dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    answers = answer_instructions("tiny-random", ["Say hi."], max_new_tokens=3, loaded=loaded)
    assert answers[0].completion_tokens >= 1

"""A merged export (`corral export --merge`) is a plain transformers folder that still records the
run it came from, so every Corral command prompts it with the template it was trained with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from corral.inference.generation import answer_instructions
from corral.inference.loading import load_for_inference
from corral.training.export import merge_run
from servers import corral_serve

from corral.errors import UsageError
from corral.records import read_alpaca, write_alpaca
from corral.rundir import read_run_info

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Name a color.", "Say hello.", "Give a synonym for quick."]


@pytest.fixture(scope="module")
def merged(lora_run, tmp_path_factory) -> Path:
    return merge_run(lora_run, tmp_path_factory.mktemp("export") / "merged")


def corral(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        cwd=REPO,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_export_records_its_template_and_its_source(merged, lora_run):
    info = read_run_info(merged)
    assert (info.kind, info.method, info.template) == ("merged", "lora", "dolly")
    assert info.merged_from == str(lora_run.resolve())
    assert info.end_marker == "### End"
    assert not (merged / "adapter_config.json").exists()


def test_a_merged_folder_answers_like_its_run_in_the_runs_template(merged, lora_run):
    loaded = load_for_inference(str(merged))
    assert (loaded.template.name, loaded.source, loaded.name) == ("dolly", "run", "merged")
    from_export = answer_instructions(str(merged), QUESTIONS, max_new_tokens=6)
    from_run = answer_instructions(lora_run, QUESTIONS, max_new_tokens=6)
    assert [a.raw for a in from_export] == [a.raw for a in from_run]
    with pytest.raises(UsageError, match="trained with template 'dolly'"):
        load_for_inference(str(merged), template="alpaca")


def test_exporting_an_export_is_refused(merged, tmp_path):
    with pytest.raises(UsageError, match="merged model folder has no adapter"):
        merge_run(merged, tmp_path / "again")


@pytest.mark.slow
def test_infer_chat_eval_and_serve_take_the_merged_folder(merged, lora_run, tmp_path):
    source = tmp_path / "questions.json"
    write_alpaca(source, [{"instruction": q} for q in QUESTIONS])
    for flag, target, out in (
        ("--model", merged, tmp_path / "merged.json"),
        ("--run", lora_run, tmp_path / "run.json"),
    ):
        result = corral(
            "infer", flag, str(target), "--input", str(source), "--output", str(out),
            "--max-new-tokens", "6", "--quiet",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert read_alpaca(tmp_path / "merged.json") == read_alpaca(tmp_path / "run.json")

    chat = corral("chat", "--model", str(merged), "--max-new-tokens", "4", stdin="Hi.\n/exit\n")
    assert chat.returncode == 0, chat.stderr

    eval_set = tmp_path / "eval.json"
    write_alpaca(eval_set, [{"instruction": q, "output": "x"} for q in QUESTIONS])
    result = corral(
        "eval", "--eval-set", str(eval_set), "--base", "tiny-random", "--tuned", str(merged),
        "--max-new-tokens", "4", "--output", str(tmp_path / "eval_result.json"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((tmp_path / "eval_result.json").read_text())
    assert evaluation["models"]["tuned"]["model"] == str(merged)

    from corral.models import load_tokenizer
    from corral.templates import get_template

    with corral_serve(["--model", str(merged)], env={"CORRAL_API_KEY": ""}) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="merged", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=4
        )
    tokenizer = load_tokenizer("tiny-random")
    dolly_prompt = get_template("dolly", tokenizer).format_prompt(QUESTIONS[0])
    assert reply.usage.prompt_tokens == len(tokenizer(dolly_prompt)["input_ids"])


def test_the_export_carries_its_format_for_other_engines(merged):
    """Plain transformers, knowing nothing of Corral, prompts the export as it was trained and
    stops where training taught it to."""
    from transformers import AutoTokenizer, GenerationConfig

    from corral.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(merged)
    template = get_template("dolly", tokenizer)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == template.format_conversation(messages)
    assert (merged / "chat_template.jinja").is_file()
    generation = GenerationConfig.from_pretrained(merged)
    # Dolly's `### End` spans tokens: EOS is the stop token, the marker a stop string.
    assert generation.eos_token_id == [tokenizer.eos_token_id]

"""Multi-turn tuning end to end: the Vicuna smoke preset under `accelerate launch`, then the run
served, a whole conversation (system message included) rendered in the format it trained on;
and the Guanaco format with QLoRA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from servers import corral_serve

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
PRESET = REPO / "configs" / "training" / "vicuna_smoke.yaml"
CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What do bees make?"},
    {"role": "assistant", "content": "Honey."},
    {"role": "user", "content": "And cows?"},
]


def launch(run_dir: Path, *overrides: str) -> None:
    result = subprocess.run(
        [ACCELERATE, "launch", str(REPO / "train.py"), "--config", str(PRESET), f"output_dir={run_dir}",
         *overrides],
        cwd="/",  # the preset finds its data beside itself, wherever the command runs
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_vicuna_run_trains_every_answer_and_serves_whole_conversations(tmp_path):
    from corral.models import load_tokenizer
    from corral.rundir import read_metrics, read_run_info
    from corral.templates import encode_prompt, get_template

    run = tmp_path / "vicuna"
    launch(run)
    assert read_run_info(run).template == "vicuna"
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert losses[-1] < losses[0]
    with corral_serve(["--run", str(run)], env={"CORRAL_API_KEY": ""}) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="vicuna", messages=CONVERSATION, max_tokens=8, temperature=0
        )
    tokenizer = load_tokenizer(str(run))
    template = get_template("vicuna", tokenizer)
    prompt = template.format_conversation(CONVERSATION)
    assert prompt.startswith("Answer in one word. USER: What do bees make? ASSISTANT: Honey.")
    assert reply.usage.prompt_tokens == len(encode_prompt(tokenizer, template, prompt))


@pytest.mark.slow
def test_guanaco_format_with_qlora(tmp_path):
    from corral.rundir import read_run_info

    run = tmp_path / "guanaco"
    launch(run, "method=qlora", "template=guanaco", "lora_target_modules=[all-linear]",
           "epochs=1")  # fmt: skip
    info = read_run_info(run)
    assert (info.template, info.method, info.response_marker) == (
        "guanaco",
        "qlora",
        "### Assistant:",
    )

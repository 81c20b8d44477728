"""Both generation modes with the real embedded model as the teacher (a few instructions each)."""

from __future__ import annotations

import json

import pytest
from corral.data_gen.config import GenerateConfig
from corral.data_gen.filters import InstructionRules
from corral.data_gen.parsers import parse_classification_answer
from corral.data_gen.pipeline import generate_dataset
from corral.data_gen.teachers import LocalTeacher, SamplingParams

from corral.config import load_config
from corral.records import read_alpaca
from corral.rouge import RougeNoveltyIndex


@pytest.fixture(scope="module")
def embedded_teacher(embedded_model_path):
    """One local teacher for the module (its model loads once); completions-style prompting."""
    return LocalTeacher("embedded", api="completions", batch_size=4, repetition_penalty=1.1, seed=0)


def check_records(result, config: GenerateConfig) -> list[dict]:
    records = read_alpaca(result.output_path)
    rules = InstructionRules()
    instructions = list(dict.fromkeys(r["instruction"] for r in records))
    assert len(instructions) == config.num_instructions
    assert all(rules.drop_reason(text) is None for text in instructions)
    index = RougeNoveltyIndex()
    from corral.records import read_seed_tasks

    index.extend(s.instruction for s in read_seed_tasks(config.seed_tasks_path()))
    assert all(index.add_if_novel(text).novel for text in instructions)
    assert all(r["output"].strip() for r in records)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["teacher"]["kind"] == "local"
    assert manifest["tokens"]["completion"] > 0
    return records


@pytest.mark.slow
def test_batched_left_padded_generation_matches_one_at_a_time(embedded_teacher):
    params = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = ["The capital of France is", "List three primary colours:\n1."]
    batched = embedded_teacher.complete(prompts, params)
    single = [embedded_teacher.complete([p], params)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.completion_tokens > 0 for c in batched)


@pytest.mark.slow
def test_alpaca_mode_with_the_embedded_teacher(tmp_path, embedded_teacher):
    # Greedy decoding keeps the test deterministic; one open item per prompt keeps it short.
    config = load_config(
        GenerateConfig,
        "configs/data_gen/embedded_demo.yaml",
        num_instructions=2,
        output=str(tmp_path / "alpaca.json"),
        temperature=0.0,
        max_tokens=80,
        tasks_per_request=4,
        requests_per_batch=2,
        max_idle_rounds=6,
    )
    result = generate_dataset(config, teacher=embedded_teacher, progress=False, log=lambda _: None)
    check_records(result, config)


@pytest.mark.slow
def test_self_instruct_mode_with_the_embedded_teacher(tmp_path, embedded_teacher, monkeypatch):
    calls: list[tuple[str, str]] = []  # (prompt, completion text) of every teacher call
    complete = embedded_teacher.complete

    def recording(prompts, params):
        completions = complete(prompts, params)
        calls.extend((p, c.text) for p, c in zip(prompts, completions, strict=True))
        return completions

    monkeypatch.setattr(embedded_teacher, "complete", recording)
    config = GenerateConfig(
        mode="self-instruct",
        api="completions",
        num_instructions=1,
        output=str(tmp_path / "si.json"),
        temperature=0.0,
        max_tokens=40,
        requests_per_batch=1,
        classification_examples=8,
        instance_examples=1,
        instance_max_tokens=48,
        max_idle_rounds=6,
    )
    result = generate_dataset(config, teacher=embedded_teacher, progress=False, log=lambda _: None)
    check_records(result, config)
    journal = [json.loads(line) for line in result.journal_path.read_text().splitlines()]
    [task] = [entry for entry in journal if entry["kind"] == "task"]
    assert task["instances"]
    # The flag is what the teacher answered to "Is it classification?" for this instruction ...
    task_line = f"Task: {' '.join(task['instruction'].split())}\n"
    answers = [text for p, text in calls if p.endswith(task_line + "Is it classification?")]
    assert answers, "the classification step never asked about the kept instruction"
    assert task["is_classification"] is bool(parse_classification_answer(answers[-1]))
    # ... and it chose the instance prompt: output-first for classification, input-first else.
    open_slot = "Class label:" if task["is_classification"] else "Example 1\nInput:"
    assert any(p.endswith(task_line + open_slot) for p, _ in calls)


def test_a_local_teacher_uses_bf16_where_the_cpu_has_it_natively():
    import torch
    from corral.data_gen.teachers import local_dtype

    from corral.models import cpu_has_native_bf16

    if not torch.cuda.is_available():
        assert local_dtype("auto") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert local_dtype("float32") == torch.float32
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        local_dtype("fp16")

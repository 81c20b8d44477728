"""Both generation modes end to end against a real OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import random

import pytest
from corral.data_gen.config import GenerateConfig
from corral.data_gen.journal import FingerprintMismatch
from corral.data_gen.manifest import run_paths
from corral.data_gen.pipeline import format_summary, generate_dataset
from openai_test_server import _LABEL_SETS, OpenAITestServer, canned_teacher_reply

from corral.cli import main as corral_main
from corral.config import load_config
from corral.records import read_alpaca
from corral.rouge import RougeNoveltyIndex

FAULTS = ["429", None, "500", "malformed", None, "503", "drop", "slow"]


def make_config(server: OpenAITestServer, tmp_path, **overrides) -> GenerateConfig:
    values = {
        "base_url": server.base_url,
        "model": "canned-teacher",
        "output": str(tmp_path / "out" / "data.json"),
        "num_instructions": 30,
        "concurrency": 4,
        "backoff_base": 0.02,
        "request_timeout": 1.0,
        **overrides,
    }
    return GenerateConfig(**values)


def assert_valid_run(result, config: GenerateConfig, seeds: list[str]) -> list[dict]:
    records = read_alpaca(result.output_path)
    manifest = json.loads(result.manifest_path.read_text())
    instructions = list(dict.fromkeys(r["instruction"] for r in records))
    assert len(instructions) == config.num_instructions == manifest["counts"]["instructions"]
    assert manifest["counts"]["records"] == len(records)
    # Every kept instruction passes the novelty filter against the seeds and the ones before it.
    index = RougeNoveltyIndex(config.rouge_threshold)
    index.extend(seeds)
    assert all(index.add_if_novel(text).novel for text in instructions)
    assert all(r["output"].strip() for r in records)
    return records


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_alpaca_mode_end_to_end_through_faults(tmp_path, api):
    with OpenAITestServer(faults=FAULTS, retry_after=0.05, slow_seconds=1.5) as server:
        config = make_config(server, tmp_path, mode="alpaca", api=api, tasks_per_request=10)
        result = generate_dataset(config, progress=False, log=lambda _: None)
    from corral.records import read_seed_tasks

    seeds = [s.instruction for s in read_seed_tasks(config.seed_tasks_path())]
    records = assert_valid_run(result, config, seeds)
    assert len(records) == 30
    manifest = result.manifest
    # The canned teacher writes some blocklisted and too-short tasks; they are counted.
    assert (
        manifest["counts"]["dropped"].get("blocklisted", 0)
        + manifest["counts"]["dropped"].get("too_short", 0)
        > 0
    )
    assert manifest["retries"] >= 6 and manifest["failed_requests"] == 0
    assert set(manifest["request_errors"]) >= {"http_429", "http_500", "malformed_reply", "timeout"}
    assert manifest["tokens"]["prompt"] > 0 and manifest["tokens"]["completion"] > 0
    assert manifest["teacher"]["base_url"] == server.base_url
    assert manifest["config"]["mode"] == "alpaca"
    # Every parsed task is accounted for: kept, or dropped with a reason.
    dropped = manifest["counts"]["dropped"]
    per_task = {
        k: v for k, v in dropped.items() if k not in ("truncated", "incomplete", "unparseable")
    }
    assert manifest["counts"]["candidates"] == 30 + sum(per_task.values())
    # Three seed demonstrations per prompt, then the open fourth item.
    assert all(p.endswith("###\n4. Instruction:") and "3. Output:" in p for p in server.prompts)
    summary = format_summary(result)
    assert "30 instructions" in summary
    assert "blocklisted" in summary or "too_short" in summary


def test_self_instruct_mode_end_to_end(tmp_path):
    with OpenAITestServer(faults=["429", None, "500"], retry_after=0.05) as server:
        config = make_config(
            server,
            tmp_path,
            mode="self-instruct",
            api="completions",
            num_instructions=20,
            temperature=0.7,
            top_p=0.5,
            max_tokens=1024,
            requests_per_batch=1,
        )
        result = generate_dataset(config, progress=False, log=lambda _: None)
        prompts = list(server.prompts)
    from corral.records import read_seed_tasks

    seeds = [s.instruction for s in read_seed_tasks(config.seed_tasks_path())]
    records = assert_valid_run(result, config, seeds)
    assert len(records) >= 20  # several instances per instruction
    counts = result.manifest["counts"]
    assert 0 < counts["classification_instructions"] < 20
    # All four steps reached the teacher.
    assert any(p.startswith("Come up with a series of tasks:") for p in prompts)
    assert any(p.endswith("Is it classification?") for p in prompts)
    assert any(p.endswith("Class label:") for p in prompts)
    assert any(p.endswith("Example 1\nInput:") for p in prompts)
    # Later bootstrap prompts mix in machine-generated instructions.
    kept = {r["instruction"] for r in records}
    last_bootstrap = [p for p in prompts if p.startswith("Come up with")][-1]
    assert any(text in last_bootstrap for text in kept)
    journal_tasks = [
        json.loads(line)
        for line in result.journal_path.read_text().splitlines()
        if '"kind": "task"' in line
    ]
    assert all(t["instances"] for t in journal_tasks)
    # Each task's flag is the canned teacher's answer for that instruction (it says Yes to
    # classify/label/whether/... tasks), and the run met both kinds.
    answers = {}
    for prompt in prompts:
        if prompt.endswith("\nIs it classification?"):
            instruction = prompt.rsplit("Task: ", 1)[1].removesuffix("\nIs it classification?")
            reply = canned_teacher_reply(prompt, random.Random(0), chat=False)
            answers[instruction] = reply.strip() == "Yes"
    assert {t["is_classification"] for t in journal_tasks} == {True, False}
    for task in journal_tasks:
        assert task["is_classification"] is answers[task["instruction"]], task["instruction"]
        # The flag chose the instance prompt: classification tasks got class labels as outputs,
        # the others the canned answers.
        outputs = [instance["output"] for instance in task["instances"]]
        if task["is_classification"]:
            assert set(outputs) <= {label for pair in _LABEL_SETS for label in pair}, outputs
        else:
            assert all(o.startswith("Here is a careful answer about") for o in outputs), outputs


def test_the_shared_175_seed_tasks_drive_a_run(tmp_path, seed_tasks_path):
    with OpenAITestServer(latency=0.0) as server:
        config = make_config(server, tmp_path, seed_tasks=str(seed_tasks_path), num_instructions=15)
        result = generate_dataset(config, progress=False, log=lambda _: None)
        first_prompt = server.prompts[0]
    seeds = [json.loads(line)["instruction"] for line in seed_tasks_path.read_text().splitlines()]
    assert_valid_run(result, config, seeds)
    assert result.manifest["seed_tasks"]["count"] == 175
    assert any(seed.strip() in first_prompt for seed in seeds)


def test_rerun_resumes_and_extends_without_duplicates(tmp_path):
    with OpenAITestServer() as server:
        config = make_config(server, tmp_path, num_instructions=10)
        first = generate_dataset(config, progress=False, log=lambda _: None)
        first_records = read_alpaca(first.output_path)
        requests_after_first = server.stats["requests"]
        # The same command again: nothing to do, the same file.
        again = generate_dataset(config, progress=False, log=lambda _: None)
        assert server.stats["requests"] == requests_after_first
        assert again.resumed and again.output_path.read_text() == first.output_path.read_text()
        # A larger target continues from the journal.
        config.num_instructions = 25
        more = generate_dataset(config, progress=False, log=lambda _: None)
    records = read_alpaca(more.output_path)
    assert len(records) == 25
    assert records[:10] == first_records
    assert len({r["instruction"] for r in records}) == 25


def test_a_journal_from_different_settings_is_not_resumed(tmp_path):
    with OpenAITestServer() as server:
        config = make_config(server, tmp_path, num_instructions=5)
        generate_dataset(config, progress=False, log=lambda _: None)
        changed = make_config(server, tmp_path, num_instructions=5, rouge_threshold=0.5)
        with pytest.raises(FingerprintMismatch, match="rouge_threshold"):
            generate_dataset(changed, progress=False, log=lambda _: None)
        # --overwrite starts over.
        result = generate_dataset(changed, progress=False, log=lambda _: None, overwrite=True)
    assert not result.resumed and len(read_alpaca(result.output_path)) == 5


def test_cli_generate_and_presets(tmp_path, capsys):
    out = tmp_path / "cli" / "alpaca.json"
    with OpenAITestServer() as server:
        code = corral_main(
            [
                "generate",
                "--config",
                "configs/data_gen/alpaca.yaml",
                "--base-url",
                server.base_url,
                "--model",
                "canned-teacher",
                "--num-instructions",
                "12",
                "--output",
                str(out),
                "--no-progress",
                "concurrency=4",
                "tasks_per_request=8",
            ]
        )
    assert code == 0
    captured = capsys.readouterr()
    assert "Generated 12 instructions" in captured.out
    _, journal, manifest = run_paths(out)
    assert journal.exists() and manifest.exists()
    assert len(read_alpaca(out)) == 12


@pytest.mark.parametrize("preset", ["alpaca.yaml", "self_instruct.yaml", "embedded_demo.yaml"])
def test_presets_load_and_name_their_command(preset):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "data_gen" / preset
    lines = path.read_text().splitlines()
    assert any(
        line.startswith("# Run:  corral generate --config configs/data_gen/" + preset)
        for line in lines[:3]
    )
    config = load_config(GenerateConfig, path)
    assert config.mode in ("alpaca", "self-instruct")


def test_cli_reports_bad_seed_file_and_bad_override(tmp_path, capsys):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "Do a thing now please", "instances": []}\n')
    code = corral_main(
        [
            "generate",
            "--seed-tasks",
            str(bad),
            "--output",
            str(tmp_path / "o.json"),
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 1" in err and "instances" in err
    assert not (tmp_path / "o.json").exists()
    code = corral_main(["generate", "--output", str(tmp_path / "o.json"), "rouge_treshold=0.5"])
    assert code == 2 and "rouge_treshold" in capsys.readouterr().err


def test_cli_reports_an_unreachable_endpoint(tmp_path, capsys):
    with OpenAITestServer(faults=["401"]) as server:
        code = corral_main(
            [
                "generate",
                "--base-url",
                server.base_url,
                "--output",
                str(tmp_path / "o.json"),
                "--no-progress",
                "--num-instructions",
                "3",
            ]
        )
    assert code == 2
    assert "refused the key" in capsys.readouterr().err

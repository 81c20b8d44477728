"""`corral generate --mode preferences`: two answers per instruction, a judge in both orders, and
only the pairs the judge agrees on, against real loopback servers and real (tiny) local models."""

from __future__ import annotations

import json
import threading

import pytest
from corral.data_gen.config import GenerateConfig
from corral.data_gen.preferences import generate_preferences, judgments_path
from openai_test_server import OpenAITestServer

from corral.cli import main as corral_main
from corral.records import write_alpaca

PROMPTS = [{"instruction": f"Describe topic number {n} briefly.", "input": ""} for n in range(6)]


class Teacher:
    """Answers a prompt short the first time and detailed the second; as judge, prefers the
    longer answer (consistent), or always says A (position-biased)."""

    def __init__(self, biased: bool = False) -> None:
        self.asked: dict[str, int] = {}
        self.biased = biased
        self.lock = threading.Lock()

    def __call__(self, prompt: str, request: dict) -> str:
        if "Which response is better?" in prompt:
            if self.biased:
                return "A"
            first = prompt.split("### Response A:\n")[1].split("\n\n### Response B:")[0]
            second = prompt.split("### Response B:\n")[1].split("\n\nWhich response")[0]
            return "A" if len(first) > len(second) else "B"
        with self.lock:  # each prompt is asked twice: first short, then detailed
            self.asked[prompt] = self.asked.get(prompt, 0) + 1
            detailed = self.asked[prompt] % 2 == 0
        topic = prompt.split("number ")[1].split(" ")[0]
        if detailed:
            return f"Topic {topic}: a detailed answer with three points and an example."
        return f"Topic {topic}."


def run(tmp_path, server, **settings):
    source = tmp_path / "prompts.json"
    write_alpaca(source, PROMPTS)
    config = GenerateConfig(
        mode="preferences", base_url=server.base_url, model="teacher",
        preference_prompts=str(source), output=str(tmp_path / "pairs.json"),
        num_instructions=6, concurrency=2, **settings,
    )  # fmt: skip
    return generate_preferences(config, progress=False)


def test_a_consistent_judge_keeps_every_pair_with_the_better_answer_chosen(tmp_path):
    with OpenAITestServer(Teacher()) as server:
        manifest = run(tmp_path, server)
    pairs = json.loads((tmp_path / "pairs.json").read_text())
    assert manifest["counts"]["records"] == len(pairs) == 6
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert "detailed answer" in pair["chosen"] and "detailed" not in pair["rejected"]
    judgments = [json.loads(line) for line in judgments_path(tmp_path / "pairs.json").open()]
    assert len(judgments) == 6
    assert judgments[0]["agreement"] == "both orders"
    assert set(judgments[0]["verdicts"].values()) == {"A", "B"}


def test_a_position_biased_judge_keeps_nothing(tmp_path):
    with OpenAITestServer(Teacher(biased=True)) as server:
        manifest = run(tmp_path, server)
    assert manifest["counts"]["records"] == 0
    assert manifest["counts"]["dropped"]["judge_inconsistent"] == 6


def test_an_interrupted_run_resumes_without_judging_twice(tmp_path, monkeypatch):
    import corral.data_gen.preferences as preferences

    real = preferences._judge_round
    calls = []

    def dies_in_round_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    teacher = Teacher()
    with OpenAITestServer(teacher) as server:
        monkeypatch.setattr(preferences, "_judge_round", dies_in_round_two)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, server)
        monkeypatch.setattr(preferences, "_judge_round", real)
        judged_before = server.stats["requests"]
        manifest = run(tmp_path, server)
    assert manifest["counts"]["records"] == 6 and manifest["resumed"]
    # Round 1 (2 prompts) was committed; the rest were answered and judged once more.
    assert server.stats["requests"] - judged_before == 4 * 2 + 4 * 2


@pytest.mark.slow
def test_a_tuned_run_answers_against_the_teacher_and_a_local_model_judges(
    tmp_path, lora_run, capsys
):
    source = tmp_path / "prompts.json"
    write_alpaca(source, PROMPTS[:3])
    with OpenAITestServer(Teacher()) as server:
        code = corral_main(
            ["generate", "--mode", "preferences", "--base-url", server.base_url, "--model", "t",
             "--output", str(tmp_path / "pairs.json"), "--no-progress",
             f"preference_prompts={source}", f"answer_sources=[teacher,{lora_run}]",
             "judge=tiny-random", "max_tokens=8"]
        )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "Judged 3 prompts" in capsys.readouterr().out
    judgments = [json.loads(x) for x in judgments_path(tmp_path / "pairs.json").open()]
    assert all(j["judge"]["kind"] == "local" for j in judgments)

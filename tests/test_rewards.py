"""Reward functions: the built-ins, a user's file, weights, a Corral reward model, and distrust of
whatever a function returns (each failure one line naming the function and the cause)."""

from __future__ import annotations

import json
import math

import pytest
from corral.training.rewards import (
    RewardFunctionError,
    build_rewards,
    normalize_answer,
    score_completions,
    weighted_total,
)
from corral.training.rl_data import arithmetic_records, read_prompt_records

from corral.errors import ConfigError, CorralError, RecordError

RECORDS = [
    {"prompt": "What is 2 + 3?", "answer": "5"},
    {"prompt": "What is 1,000 + 1?", "answer": "1,001"},
]


def test_normalisation_ignores_case_edges_and_thousands_separators():
    assert normalize_answer('  "The Cat."  ') == "the cat"
    assert normalize_answer("1,001") == normalize_answer("1001") == "1001"
    assert normalize_answer("a   b") == "a b"


def test_builtins_score_answers_format_and_length():
    rewards = build_rewards(
        ["exact_answer", "final_number", r"format:\d+", "length:4"], [1.0, 0.5, 0.25, 2.0]
    )
    completions = ["5.", "The answer is 1001"]
    per_function = score_completions(rewards, RECORDS, completions)
    assert per_function == [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    assert weighted_total(per_function, rewards) == [1.0 + 0.5 + 2.0, 0.5]
    # length: 1 up to N characters, 0 from 2N on, linear between.
    length = build_rewards(["length:4"])[0]
    assert score_completions([length], RECORDS[:1] * 3, ["abcd", "abcdef", "a" * 9]) == [
        [1.0, 0.5, 0.0]
    ]


def write_reward_file(tmp_path, body: str):
    path = tmp_path / "my_rewards.py"
    path.write_text(body)
    return path


def test_a_user_function_gets_prompts_completions_and_every_field_as_lists(tmp_path):
    path = write_reward_file(
        tmp_path,
        "seen = {}\n"
        "def rate(prompts, completions, answer, **fields):\n"
        "    seen.update(prompts=prompts, answer=answer, fields=fields)\n"
        "    return [float(len(c)) for c in completions]\n",
    )
    (reward,) = build_rewards([f"{path}:rate"])
    records = [dict(r, level=i) for i, r in enumerate(RECORDS)]
    assert score_completions([reward], records, ["ab", "abc"]) == [[2.0, 3.0]]
    module_globals = reward.function.__globals__
    assert module_globals["seen"]["prompts"] == [r["prompt"] for r in RECORDS]
    assert module_globals["seen"]["answer"] == ["5", "1,001"]
    assert module_globals["seen"]["fields"] == {"level": [0, 1]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("def f(prompts, completions, **k):\n    return [1.0]\n", "returned 1 values for 2"),
        ("def f(prompts, completions, **k):\n    return [1.0, 'high']\n", "'high' (str)"),
        (
            "def f(prompts, completions, **k):\n    return [1.0, float('nan')]\n",
            "nan for completion 1",
        ),
        (
            "def f(prompts, completions, **k):\n    return [1.0, float('inf')]\n",
            "inf for completion 1",
        ),
        ("def f(prompts, completions, **k):\n    return [1.0, None]\n", "None (NoneType)"),
        ("def f(prompts, completions, **k):\n    return 1.0\n", "returned float"),
        ("def f(prompts, completions, **k):\n    raise KeyError('answer')\n", "raised KeyError"),
    ],
)
def test_reward_output_is_never_trusted(tmp_path, body, message):
    path = write_reward_file(tmp_path, body)
    rewards = build_rewards([f"{path}:f"])
    with pytest.raises(RewardFunctionError) as caught:
        score_completions(rewards, RECORDS, ["a", "b"])
    text = str(caught.value)
    assert message in text and f"{path}:f" in text and "\n" not in text
    assert isinstance(caught.value, CorralError)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{path}:missing", "defines no 'missing'"),
        ("{tmp}/absent.py:f", "not found"),
        ("{broken}:f", "importing"),
        ("format:(", "invalid regex"),
        ("length:0", "length:N"),
        ("bleu", "expected exact_answer"),
    ],
)
def test_unloadable_reward_functions_are_named_with_the_cause(tmp_path, spec, message):
    path = write_reward_file(tmp_path, "def f(prompts, completions, **k):\n    return []\n")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    spec = spec.format(path=path, tmp=tmp_path, broken=broken)
    with pytest.raises(ConfigError) as caught:
        build_rewards([spec])
    assert message in str(caught.value) and spec in str(caught.value)


def test_weights_must_match_the_functions():
    with pytest.raises(ConfigError, match="2 weights for 1 reward"):
        build_rewards(["exact_answer"], [1.0, 2.0])
    with pytest.raises(ConfigError, match="needs a reward"):
        build_rewards([])


def test_prompt_records_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n" + json.dumps({"answer": "2"}))
    with pytest.raises(RecordError, match=r"prompts.jsonl: line 2: field 'prompt'"):
        read_prompt_records(path)
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(RecordError, match="line 1: field 'prompt': expected a string"):
        read_prompt_records(path)
    path.write_text(json.dumps({"prompt": "a"}))
    with pytest.raises(RecordError, match="field 'answer': missing field a reward function reads"):
        read_prompt_records(path, required_fields=("answer",))
    assert read_prompt_records(path) == [{"prompt": "a"}]


def test_the_builtin_task_is_the_same_for_a_seed_and_has_distinct_questions():
    first, again, other = (
        arithmetic_records(0, 64),
        arithmetic_records(0, 64),
        arithmetic_records(1, 64),
    )
    assert first == again != other
    assert len({r["prompt"] for r in first}) == 64
    for record in first:
        numbers = [int(n) for n in record["prompt"].split("?")[0].split() if n.isdigit()]
        expected = {
            "add": sum(numbers),
            "subtract": numbers[0] - numbers[-1],
            "next": numbers[0] + 1,
        }
        assert int(record["answer"]) == expected[record["kind"]]


def test_a_reward_model_run_scores_completions(tmp_path, tiny_model_path):
    """A method=reward run directory (built with peft directly on tiny-random) as a reward."""
    from model_runs import random_reward_run

    run = random_reward_run(
        tmp_path / "reward-run", "tiny-random", tiny_model_path, template="alpaca"
    )
    (reward,) = build_rewards([], reward_model=str(run))
    scores = score_completions([reward], RECORDS, ["five", "a thousand and one"])[0]
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores) and scores[0] != scores[1]


def test_the_presets_task_file_is_the_builtin_task_for_seed_0():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "training" / "grpo_arithmetic.jsonl"
    records = read_prompt_records(path, required_fields=("answer",))
    assert records == arithmetic_records(0, len(records)) and len(records) == 256

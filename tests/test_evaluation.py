"""`corral eval`: ROUGE-L against references and a pairwise judge in both answer orders.

Only the test of the user-oriented set itself needs the Self-Instruct reference data (and skips
without it); the others use a small evaluation set in the same format, written here."""

from __future__ import annotations

import json

import pytest
from corral.data_gen.judges import EndpointJudge, combine_orders, judge_prompt, parse_verdict
from corral.evaluation.evaluate import EvalItem, read_eval_set
from openai_test_server import OpenAITestServer

from corral.cli import main
from corral.errors import RecordError


def test_parse_verdict():
    assert parse_verdict("A") == "A"
    assert parse_verdict(" b.") == "B"
    assert parse_verdict("Response B is better") == "B"
    assert parse_verdict("Neither") is None
    assert parse_verdict("") is None


@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [
        ("B", "A", "tuned"),
        ("A", "B", "base"),
        ("A", "A", "tie"),
        ("B", "B", "tie"),
        (None, "A", "tie"),
    ],
)
def test_a_win_needs_both_orders(first, second, winner):
    assert combine_orders(first, second) == winner


def test_judge_prompt_places_answers_and_input():
    item = EvalItem("Sum the numbers.", "1, 2", "3")
    prompt = judge_prompt(item.instruction, item.input, "first answer", "second answer")
    assert prompt.index("### Response A:\nfirst answer") < prompt.index(
        "### Response B:\nsecond answer"
    )
    assert "### Input:\n1, 2" in prompt
    assert "### Input:" not in judge_prompt("Say hi.", "", "x", "y")


EVAL_TASKS = [
    {
        "id": "task_0",
        "motivation_app": "Notes",
        "instruction": "Fix the spelling mistakes in the sentence.",
        "instances": [{"input": "I recieved teh letter.", "output": "I received the letter."}],
    },
    {
        "id": "task_1",
        "motivation_app": "Mail",
        "instruction": "Write a one-line subject for the email.",
        "instances": [
            {"input": "The meeting moves to Friday at 10.", "output": "Meeting moved to Friday"},
            {"input": "Lunch is on us today.", "output": "Free lunch today"},
        ],
    },
    {
        "id": "task_2",
        "motivation_app": "Maps",
        "instruction": "Name the capital of France.",
        "instances": [{"input": "", "output": "Paris"}],
    },
]


def write_eval_set(path):
    path.write_text("".join(json.dumps(task) + "\n" for task in EVAL_TASKS))
    return path


def test_eval_set_reads_the_first_instance_of_each_task(tmp_path):
    items = read_eval_set(write_eval_set(tmp_path / "eval.jsonl"))
    assert items == [
        EvalItem("Fix the spelling mistakes in the sentence.", "I recieved teh letter.",
                 "I received the letter."),
        EvalItem("Write a one-line subject for the email.", "The meeting moves to Friday at 10.",
                 "Meeting moved to Friday"),
        EvalItem("Name the capital of France.", "", "Paris"),
    ]  # fmt: skip
    assert read_eval_set(tmp_path / "eval.jsonl", limit=2) == items[:2]


def test_user_oriented_set_reads_first_instances(user_oriented_path):
    items = read_eval_set(user_oriented_path)
    assert len(items) == 252
    assert all(i.instruction and i.reference for i in items)
    assert len(read_eval_set(user_oriented_path, limit=5)) == 5


def test_endpoint_judge_parses_replies_from_a_real_server():
    verdicts = iter(["B", "Response A.", "I cannot tell"])
    with OpenAITestServer(responder=lambda prompt, request: next(verdicts)) as server:
        judge = EndpointJudge("judge-model", server.base_url, concurrency=1)
        assert judge.judge(["p1", "p2", "p3"]) == ["B", "A", None]


@pytest.mark.slow
def test_eval_with_embedded_as_contestants_and_judge(tmp_path, capsys):
    eval_set = write_eval_set(tmp_path / "eval_set.jsonl")
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval", "--eval-set", str(eval_set), "--base", "embedded",
            "--tuned", "embedded", "--limit", "2", "--max-new-tokens", "12",
            "--judge", "embedded", "--output", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "corral-eval" and result["num_items"] == 2
    base, tuned = result["models"]["base"], result["models"]["tuned"]
    assert 0.0 <= base["rouge_l"] <= 1.0 and base["mean_words"] > 0
    # Greedy decoding: the same model gives the same answers and scores.
    assert base["rouge_l_per_item"] == tuned["rouge_l_per_item"]
    # Identical answers: the judge sees the same prompt in both orders, so it names the same
    # letter twice, and a position-bias-free comparison calls every item a tie.
    assert result["judge"]["win_rate"] == {"tuned": 0.0, "base": 0.0, "tie": 1.0}
    assert all(row["judge"]["base_first"] == row["judge"]["tuned_first"] for row in result["items"])
    assert "judge embedded" in capsys.readouterr().out


def test_eval_needs_an_eval_set_or_harness_tasks(tmp_path, capsys):
    assert main(["eval", "--output", str(tmp_path / "e.json")]) == 2
    assert "--eval-set" in capsys.readouterr().err
    missing = tmp_path / "no-lm-eval"
    code = main(["eval", "--lm-eval-tasks", "arc_easy", "--lm-eval", str(missing),
                 "--output", str(tmp_path / "e.json")])  # fmt: skip
    assert code == 2
    assert f"{missing}: not an executable lm_eval" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_harness_model_args_give_an_adapter_run_as_peft_on_its_base(lora_run, tiny_model_path):
    from corral.evaluation.harness import lm_eval_command, model_args

    args, description = model_args(str(lora_run))
    assert (
        args
        == f"pretrained={tiny_model_path},peft={lora_run.resolve()},tokenizer={lora_run.resolve()}"
    )
    assert "adapter on tiny-random" in description
    assert model_args("tiny-random")[0] == f"pretrained={tiny_model_path}"
    command = lm_eval_command(
        "lm_eval", "tiny-random", "arc_easy", lora_run, limit=5, chat_template=True, device="cpu"
    )
    assert command[:3] == ["lm_eval", "--model", "hf"]
    assert command[command.index("--limit") + 1] == "5" and "--apply_chat_template" in command
    assert command[command.index("--output_path") + 1] == str(lora_run)


CONVERSATION_EVAL = [
    {
        "conversations": [
            {"from": "system", "value": "You answer in one word."},
            {"from": "human", "value": "Name a primary color."},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "And another one?"},
            {"from": "gpt", "value": "Blue."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Double it."},
            {"role": "assistant", "content": "8"},
        ]
    },
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris"},
]


def test_a_conversation_is_asked_its_last_question_with_the_turns_before_it(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATION_EVAL))
    first, second, alpaca = read_eval_set(path)
    assert (first.instruction, first.reference) == ("And another one?", "Blue.")
    assert [t["role"] for t in first.history] == ["system", "user", "assistant"]
    assert first.record()["messages"][-1] == {"role": "user", "content": "And another one?"}
    assert (second.instruction, second.reference, len(second.history)) == ("Double it.", "8", 2)
    assert "User: What is 2 + 2?\nAssistant: 4" in second.judge_context()
    assert alpaca == EvalItem("Name the capital of France.", "", "Paris")
    assert "messages" not in alpaca.record()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl: line 1: field 'messages': no answered"):
        read_eval_set(bad)


@pytest.mark.slow
def test_eval_answers_conversations_in_each_models_template_and_the_judge_sees_them(
    tmp_path, lora_run, capsys
):
    from corral.inference.generation import record_prompt
    from corral.inference.loading import load_for_inference

    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATION_EVAL))
    items = read_eval_set(path)
    # The tuned run (Dolly format) is asked the whole conversation in its own format.
    loaded = load_for_inference(str(lora_run))
    text = loaded.tokenizer.decode(record_prompt(loaded, items[1].record()))
    assert text.index("What is 2 + 2?") < text.index("4") < text.index("Double it.")
    assert text.count("### Instruction:") == 2 and text.rstrip().endswith("### Response:")

    judged: list[str] = []

    def judge(prompt, request):
        judged.append(prompt)
        return "A"

    out = tmp_path / "eval.json"
    with OpenAITestServer(responder=judge) as server:
        code = main(
            ["eval", "--eval-set", str(path), "--base", "tiny-random", "--tuned", str(lora_run),
             "--max-new-tokens", "4", "--judge-base-url", server.base_url, "--judge-model", "j",
             "--output", str(out)]
        )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert [len(row.get("history", [])) for row in result["items"]] == [3, 2, 0]
    assert result["items"][1]["reference"] == "8"
    assert len(judged) == 6 and sum("Earlier in the conversation" in p for p in judged) == 4
    # The same letter in both orders: position bias, cancelled into ties.
    assert result["judge"]["win_rate"]["tie"] == 1.0

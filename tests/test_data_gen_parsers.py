"""Pure parts of data generation: prompts, parsers and rule filters (milliseconds, no model)."""

from __future__ import annotations

from collections import Counter

import pytest
from corral.data_gen import filters, parsers, prompts
from corral.data_gen.config import DEFAULT_SEED_TASKS
from corral.data_gen.filters import InstructionRules, filter_instances

from corral.records import SeedTask, read_seed_tasks


def _seed(instruction: str, inp: str = "", out: str = "answer", cls: bool = False) -> SeedTask:
    return SeedTask(
        instruction=instruction, instances=[{"input": inp, "output": out}], is_classification=cls
    )


# ---------------------------------------------------------------- the shipped seed set


def test_default_seed_set_is_valid_diverse_and_passes_its_own_filters():
    seeds = read_seed_tasks(DEFAULT_SEED_TASKS)
    assert len(seeds) >= 40
    assert 8 <= sum(s.is_classification for s in seeds) < len(seeds) - 20
    assert len({s.instruction for s in seeds}) == len(seeds)
    assert any(s.instances[0]["input"] for s in seeds) and any(
        not s.instances[0]["input"] for s in seeds
    )
    rules = InstructionRules()
    assert [s.instruction for s in seeds if rules.drop_reason(s.instruction)] == []
    from corral.rouge import RougeNoveltyIndex

    index = RougeNoveltyIndex()
    assert all(index.add_if_novel(s.instruction).novel for s in seeds)


# ---------------------------------------------------------------- prompts


def test_alpaca_prompt_renders_demonstrations_and_ends_at_the_open_item():
    seeds = [_seed("Name a colour of the sky.", out="Blue"), _seed("Add the numbers.", "2, 3", "5")]
    text = prompts.alpaca_prompt(seeds, num_tasks=7)
    assert "List of 7 tasks:" in text
    assert (
        "###\n1. Instruction: Name a colour of the sky.\n1. Input:\n<noinput>\n1. Output:\nBlue\n"
        in text
    )
    assert "2. Input:\n2, 3\n2. Output:\n5\n" in text
    assert text.endswith("###\n3. Instruction:")
    assert prompts.alpaca_stop_sequences(7) == ["\n8.", "8. Instruction"]


def test_self_instruct_prompts_have_their_open_slots():
    boot = prompts.bootstrap_prompt(["First  task\nwith newline.", "Second task."])
    assert boot.startswith(prompts.BOOTSTRAP_HEADER)
    assert "Task 1: First task with newline.\nTask 2: Second task.\nTask 3:" in boot
    assert boot.endswith("Task 3:")
    seeds = [
        _seed("Is this spam?", "win money", "Spam", cls=True),
        _seed("Tell a story.", out="Once"),
    ]
    cls = prompts.classification_prompt(seeds, "Sort the fruit by colour.")
    assert "Task: Is this spam?\nIs it classification? Yes" in cls
    assert "Task: Tell a story.\nIs it classification? No" in cls
    assert cls.endswith("Task: Sort the fruit by colour.\nIs it classification?")
    out_first = prompts.instances_prompt(seeds[:1], "Label the mood.", is_classification=True)
    assert "Class label: Spam\nInput: win money\n" in out_first
    assert out_first.endswith("Task: Label the mood.\nClass label:")
    in_first = prompts.instances_prompt(seeds[1:], "Write a limerick.", is_classification=False)
    assert "Example 1\nInput: <noinput>\nOutput: Once\n" in in_first
    assert in_first.endswith("Task: Write a limerick.\nExample 1\nInput:")


# ---------------------------------------------------------------- Alpaca parser

CONTINUATION = """ Give three tips for learning to juggle.
4. Input:
<noinput>
4. Output:
Start with one ball, practise daily, and keep your throws at eye level.
###
5. Instruction: Convert the temperature to Fahrenheit.
5. Input: 25 degrees Celsius
5. Output:
77 degrees Fahrenheit.
###
6. Instruction: Summarize the plot of a famous novel in one
6. Input:"""


def test_alpaca_parser_reads_a_completion_continuation():
    result = parsers.parse_alpaca_tasks(CONTINUATION, "stop")
    assert result.items[:2] == [
        {
            "instruction": "Give three tips for learning to juggle.",
            "input": "",
            "output": "Start with one ball, practise daily, and keep your throws at eye level.",
        },
        {
            "instruction": "Convert the temperature to Fahrenheit.",
            "input": "25 degrees Celsius",
            "output": "77 degrees Fahrenheit.",
        },
    ]
    # The third item has no output: incomplete.
    assert result.drops == Counter({parsers.INCOMPLETE: 1})


def test_alpaca_parser_drops_the_last_item_when_the_teacher_ran_out_of_tokens():
    result = parsers.parse_alpaca_tasks(CONTINUATION, "length")
    assert len(result.items) == 2
    assert result.drops == Counter({parsers.TRUNCATED: 1})


def test_alpaca_parser_handles_chat_prose_and_markdown():
    reply = """Sure! Here are more tasks for your list:

**4. Instruction:** Suggest a name for a pet turtle.
**4. Input:**
<noinput>
**4. Output:**
Shelly.

### 5. Instruction: Rewrite the sentence in the passive voice.
5. Input: The cat chased the mouse.
5. Output: The mouse was chased by the cat.

I hope these help!"""
    result = parsers.parse_alpaca_tasks(reply, "stop")
    assert [r["instruction"] for r in result.items] == [
        "Suggest a name for a pet turtle.",
        "Rewrite the sentence in the passive voice.",
    ]
    assert result.items[0]["input"] == "" and result.items[0]["output"] == "Shelly."
    assert result.items[1]["output"].startswith("The mouse was chased by the cat.")


def test_alpaca_parser_reports_unparseable_text():
    result = parsers.parse_alpaca_tasks("I cannot help with that.", "stop")
    assert result.items == [] and result.drops == Counter({parsers.UNPARSEABLE: 1})


# ---------------------------------------------------------------- Self-Instruct parsers


def test_bootstrap_parser_continuation_and_chat_forms():
    cont = " Plan a picnic menu for six people.\nTask 10: Explain why the moon has phases.\nTask 11: Name"
    result = parsers.parse_bootstrap_instructions(cont, "length")
    assert [r["instruction"] for r in result.items] == [
        "Plan a picnic menu for six people.",
        "Explain why the moon has phases.",
    ]
    assert result.drops == Counter({parsers.TRUNCATED: 1})
    chat = "Here are some new tasks:\n\nTask 9: Describe a sunrise.\n**Task 10:** List three uses of salt.\n"
    result = parsers.parse_bootstrap_instructions(chat, "stop")
    assert [r["instruction"] for r in result.items] == [
        "Describe a sunrise.",
        "List three uses of salt.",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [(" Yes", True), (" no.", False), ("\n**Yes**, it is", True), (" Maybe", None), ("", None)],
)
def test_classification_answer(text, expected):
    assert parsers.parse_classification_answer(text) is expected


def test_instances_parser_input_first():
    text = (
        " The quick brown fox.\nOutput: Fox.\n\nExample 2\nInput: <noinput>\nOutput: Nothing here.\n\n"
        "Example 3\nInput: Half an"
    )
    result = parsers.parse_instances(text, is_classification=False, finish_reason="stop")
    assert result.items == [
        {"input": "The quick brown fox.", "output": "Fox."},
        {"input": "", "output": "Nothing here."},
    ]
    assert result.drops == Counter({parsers.INCOMPLETE: 1})


def test_instances_parser_output_first():
    text = " Positive\nInput: I loved it.\nClass label: Negative\nInput: Never again.\n"
    result = parsers.parse_instances(text, is_classification=True)
    assert result.items == [
        {"input": "I loved it.", "output": "Positive"},
        {"input": "Never again.", "output": "Negative"},
    ]


# ---------------------------------------------------------------- rule filters


@pytest.mark.parametrize(
    ("instruction", "reason"),
    [
        ("Tell a joke.", filters.TOO_SHORT),
        ("word " * 151, filters.TOO_LONG),
        ("Describe the IMAGE in detail please.", filters.BLOCKLISTED),
        ("Explain how to go to the station from here.", filters.BLOCKLISTED),
        ("Write a program that sorts a list.", filters.WRITE_A_PROGRAM),
        ("- List three kinds of clouds.", filters.STARTS_WITH_PUNCTUATION),
        ("¿Cuál es la capital de Francia hoy?", filters.STARTS_NON_ASCII),
        ("Explain how imagery works in poems.", None),  # "image" only as a whole word
        ("Give four reasons to learn mapping skills.", None),
    ],
)
def test_instruction_rules(instruction, reason):
    assert InstructionRules().drop_reason(instruction) == reason


def test_instance_filter_drops_duplicates_conflicts_and_empty_outputs():
    instances = [
        {"input": "a", "output": "1"},
        {"input": "a", "output": "1"},  # exact duplicate
        {"input": "b", "output": "2"},
        {"input": "b", "output": "3"},  # conflict: both b's go
        {"input": "c", "output": " "},  # empty output
        {"input": "", "output": "x"},
        {"input": "", "output": "y"},  # a second answer to a no-input task
    ]
    kept, drops = filter_instances(instances)
    assert kept == [{"input": "a", "output": "1"}, {"input": "", "output": "x"}]
    assert drops == Counter(
        {filters.DUPLICATE_INSTANCE: 1, filters.CONFLICTING_INSTANCES: 3, filters.EMPTY_OUTPUT: 1}
    )

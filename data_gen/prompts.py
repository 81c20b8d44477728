"""Teacher prompts for every generation mode. Pure string work: no I/O, no frameworks.

Stanford Alpaca mode asks for a numbered list of complete tasks (instruction, input, output) after a
few seed demonstrations rendered as `###` blocks. Self-Instruct mode (Wang et al.) runs three kinds
of prompts: bootstrap new instructions as `Task N:` lines, ask whether a task is classification,
and generate instances for a task (input-first, or output-first for classification).
Conversations mode (self-chat, as Baize and UltraChat made theirs) has the teacher play the user
for a follow-up question, then answer it, turn after turn.

Every prompt ends where the teacher should continue, so completion models continue it directly;
chat models receive the same text as one user message and the parsers tolerate their prose.
"""

from __future__ import annotations

from collections.abc import Sequence

from corral.records import SeedTask

NO_INPUT = "<noinput>"

_ALPACA_INTRO = """\
You are asked to write {num_tasks} varied task instructions for a language model, each with an \
optional input and a good answer. The tasks will be used to teach a model to follow instructions.

Rules:
1. Do not repeat verbs across instructions; vary the wording as much as possible.
2. Mix many kinds of tasks: open questions, rewriting, classification, brainstorming, math, \
editing, extraction, advice, coding and more.
3. Each task must be something a text-only model can do: it cannot see, hear or produce images, \
audio or files, and cannot act in the world.
4. Write the instructions in English, in one or two sentences, as questions or as imperatives.
5. Add an input only when the task needs one (a passage, a list, a sentence to rewrite, a \
problem); it must be concrete, real content of up to about 100 words, not a placeholder. \
Otherwise write "{no_input}" as the input.
6. The output must actually complete the task, in under 100 words.

List of {num_tasks} tasks:
"""


def render_alpaca_demonstration(number: int, instruction: str, input: str, output: str) -> str:
    """One `###` block: `N. Instruction:`, `N. Input:` (`<noinput>` when empty), `N. Output:`."""
    shown_input = input.strip() or NO_INPUT
    return (
        f"###\n{number}. Instruction: {instruction.strip()}\n"
        f"{number}. Input:\n{shown_input}\n"
        f"{number}. Output:\n{output.strip()}\n"
    )


def alpaca_prompt(demonstrations: Sequence[SeedTask], num_tasks: int = 20) -> str:
    """The Stanford Alpaca request: demonstrations 1..k, then the open item k+1."""
    parts = [_ALPACA_INTRO.format(num_tasks=num_tasks, no_input=NO_INPUT)]
    for number, seed in enumerate(demonstrations, start=1):
        record = seed.as_alpaca()
        parts.append(
            render_alpaca_demonstration(
                number, record["instruction"], record["input"], record["output"]
            )
        )
    parts.append(f"###\n{len(demonstrations) + 1}. Instruction:")
    return "".join(parts)


def alpaca_stop_sequences(num_tasks: int = 20) -> list[str]:
    """Stop once the teacher starts the item after the last one asked for."""
    return [f"\n{num_tasks + 1}.", f"{num_tasks + 1}. Instruction"]


# ---------------------------------------------------------------- Self-Instruct

BOOTSTRAP_HEADER = "Come up with a series of tasks:\n\n"


def bootstrap_prompt(instructions: Sequence[str]) -> str:
    """Self-Instruct step 1: in-context instructions as `Task N:` lines, then the next open line."""
    lines = [BOOTSTRAP_HEADER]
    for number, instruction in enumerate(instructions, start=1):
        lines.append(f"Task {number}: {_one_line(instruction)}\n")
    lines.append(f"Task {len(instructions) + 1}:")
    return "".join(lines)


def bootstrap_stop_sequences(max_tasks: int = 16) -> list[str]:
    return [f"Task {max_tasks + 1}", f"\n{max_tasks + 1}."]


CLASSIFICATION_QUESTION = "Is it classification?"

_CLASSIFICATION_INTRO = (
    "Decide whether each task is a classification task: one whose answer is a label taken from a "
    "small, fixed set of possible outputs.\n\n"
)


def classification_prompt(examples: Sequence[SeedTask], instruction: str) -> str:
    """Self-Instruct step 2: few-shot "Is it classification? Yes/No", ending at the open answer."""
    parts = [_CLASSIFICATION_INTRO]
    for seed in examples:
        answer = "Yes" if seed.is_classification else "No"
        parts.append(f"Task: {_one_line(seed.instruction)}\n{CLASSIFICATION_QUESTION} {answer}\n\n")
    parts.append(f"Task: {_one_line(instruction)}\n{CLASSIFICATION_QUESTION}")
    return "".join(parts)


_INPUT_FIRST_INTRO = (
    "Write examples for each task below. Give several examples when the task allows it. Each "
    'example has an input and an output; when the task needs no input, write "Input: '
    + NO_INPUT
    + '" and give the output directly.\n\n'
)

_OUTPUT_FIRST_INTRO = (
    "Each task below is a classification task. List its possible class labels, and for each label "
    "write an input that belongs to it. When the task needs no input, write "
    '"Input: ' + NO_INPUT + '".\n\n'
)


def _render_instances_input_first(seed_instruction: str, instances: Sequence[dict]) -> str:
    parts = [f"Task: {_one_line(seed_instruction)}\n"]
    for number, inst in enumerate(instances, start=1):
        parts.append(
            f"Example {number}\nInput: {inst['input'].strip() or NO_INPUT}\n"
            f"Output: {inst['output'].strip()}\n"
        )
    return "".join(parts) + "\n"


def _render_instances_output_first(seed_instruction: str, instances: Sequence[dict]) -> str:
    parts = [f"Task: {_one_line(seed_instruction)}\n"]
    for inst in instances:
        parts.append(
            f"Class label: {inst['output'].strip()}\nInput: {inst['input'].strip() or NO_INPUT}\n"
        )
    return "".join(parts) + "\n"


def instances_prompt(
    examples: Sequence[SeedTask], instruction: str, *, is_classification: bool
) -> str:
    """Self-Instruct step 3: instances for a new task, output-first for classification."""
    if is_classification:
        parts = [_OUTPUT_FIRST_INTRO]
        parts += [_render_instances_output_first(s.instruction, s.instances) for s in examples]
        parts.append(f"Task: {_one_line(instruction)}\nClass label:")
    else:
        parts = [_INPUT_FIRST_INTRO]
        parts += [_render_instances_input_first(s.instruction, s.instances) for s in examples]
        parts.append(f"Task: {_one_line(instruction)}\nExample 1\nInput:")
    return "".join(parts)


def instances_stop_sequences() -> list[str]:
    """The teacher is done with this task once it starts another one."""
    return ["\nTask:", "Task:"]


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------- conversations (self-chat)

USER_SPEAKER = "User"
ASSISTANT_SPEAKER = "Assistant"

_FOLLOW_UP = """Below is a conversation between a user and a helpful AI assistant.

{transcript}

Write the user's next message: one natural follow-up question or request that builds on the conversation so far (asks for more detail, a variation, an example, or a related task). Write only the message, without a label.

{user}:"""

_REPLY = """Below is a conversation between a user and a helpful AI assistant.

{transcript}

Write the assistant's reply to the user's last message: correct, helpful and to the point, in under 150 words. Write only the reply, without a label.

{assistant}:"""


def transcript(messages: Sequence[dict[str, str]]) -> str:
    """A conversation as `User: ...` / `Assistant: ...` paragraphs."""
    speakers = {"user": USER_SPEAKER, "assistant": ASSISTANT_SPEAKER}
    return "\n\n".join(f"{speakers[m['role']]}: {m['content'].strip()}" for m in messages)


def follow_up_prompt(messages: Sequence[dict[str, str]]) -> str:
    """Ask the teacher to play the user for one more turn."""
    return _FOLLOW_UP.format(transcript=transcript(messages), user=USER_SPEAKER)


def reply_prompt(messages: Sequence[dict[str, str]]) -> str:
    """Ask the teacher to answer the conversation's last user message."""
    return _REPLY.format(transcript=transcript(messages), assistant=ASSISTANT_SPEAKER)


def turn_stop_sequences() -> list[str]:
    """Where a teacher that keeps writing the transcript has finished its one turn."""
    return [f"\n{USER_SPEAKER}:", f"\n{ASSISTANT_SPEAKER}:"]

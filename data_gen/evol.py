"""Evol-Instruct (WizardLM): rewrite instructions into harder or new ones. Pure: prompts, parsing,
and the elimination rules.

In-depth evolution makes an instruction harder in one of five ways (add a constraint, deepen,
concretise, ask for more reasoning steps, add an input to work on); in-breadth evolution writes a
new instruction in the same domain on a rarer topic. An evolved instruction and its answer are
eliminated, each with a named reason, when the rewrite adds no information to its parent, echoes
the rewriting prompt's own words, is too short (the shared length rules), or when the teacher could
not answer it (an apology in a short answer, or an answer of punctuation and filler words alone).
"""

from __future__ import annotations

import re

# Drop reasons (manifest names), beside those of filters.py.
NO_INFORMATION_GAIN = "no_information_gain"
COPIED_PROMPT_WORDS = "copied_prompt_words"
COULD_NOT_ANSWER = "teacher_could_not_answer"
ANSWER_WITHOUT_CONTENT = "answer_without_content"

IN_DEPTH = {
    "add_constraints": "add one more requirement or constraint that a good answer has to meet.",
    "deepen": "ask for more depth: probe the underlying issue further, or widen what it covers.",
    "concretize": "replace general ideas in it with more specific, concrete ones.",
    "increase_reasoning": (
        "if it can be settled in one or two simple steps, make it explicitly call for reasoning "
        "through several steps."
    ),
    "complicate_input": (
        "give it input data to work on (a short table, a code snippet, a list of numbers or a "
        "passage of text), written out in full inside the instruction, and refer to it."
    ),
}
BREADTH = "breadth"
OPERATIONS = (*IN_DEPTH, BREADTH)

_DEPTH_PROMPT = """You are improving a set of instructions for training an assistant. Write a \
new version of the instruction below that is harder to carry out well. To make it harder, \
{how}
The new version must make sense on its own, be answerable by a knowledgeable person, and keep any \
table, code or data the original holds. Keep it at most about 20 words longer than the original. \
Reply with the new instruction alone, with no preface and no label.

Original instruction:
{instruction}

New instruction:"""

_BREADTH_PROMPT = """You are growing a set of instructions for training an assistant. Taking the \
instruction below as inspiration only, write a brand-new instruction from the same domain but on \
a different, less common topic or skill, about as long and as hard as the original. It must make \
sense on its own and be answerable by a knowledgeable person. Reply with the new instruction \
alone, with no preface and no label.

Original instruction:
{instruction}

New instruction:"""

# Words of the rewriting prompts that a rewrite which misunderstood its task carries over.
_PROMPT_WORDS = re.compile(
    r"original instruction|new instruction|new version|given instruction|rewritten|"
    r"set of instructions|brand-new instruction",
    re.IGNORECASE,
)
_SORRY = re.compile(
    r"\b(?:sorry|apolog\w+|i cannot|i can't|i am unable|i'm unable|as an ai)\b", re.I
)
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
_FILLER = frozenset(
    "a an the and or but of to in on at for with by from is are was were be been it this that "
    "these those i you he she we they my your our its their me him her us them so as if then "
    "than too very just not no yes ok okay well oh um uh".split()
)


def evolution_prompt(operation: str, instruction: str) -> str:
    """The request that evolves `instruction` by `operation` (one of OPERATIONS)."""
    if operation == BREADTH:
        return _BREADTH_PROMPT.format(instruction=instruction.strip())
    if operation not in IN_DEPTH:
        raise ValueError(f"unknown evolution {operation!r}; choose from {', '.join(OPERATIONS)}")
    return _DEPTH_PROMPT.format(how=IN_DEPTH[operation], instruction=instruction.strip())


def parse_evolved(text: str) -> str:
    """The rewritten instruction from a reply: its text, without wrapping quotes."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)} - _FILLER


def instruction_elimination(
    parent: str, evolved: str, operation: str, min_new_words: int
) -> str | None:
    """Why an evolved instruction is eliminated before it is answered, or None."""
    if _PROMPT_WORDS.search(evolved):
        return COPIED_PROMPT_WORDS
    if operation != BREADTH or evolved.strip() == parent.strip():
        if len(content_words(evolved) - content_words(parent)) < min_new_words:
            return NO_INFORMATION_GAIN
    return None


def answer_elimination(answer: str) -> str | None:
    """Why the teacher's answer to an evolved instruction eliminates it, or None: an apology in
    a short answer (under 80 words) means the instruction was too hard or not answerable."""
    if not content_words(answer):
        return ANSWER_WITHOUT_CONTENT
    if _SORRY.search(answer) and len(answer.split()) < 80:
        return COULD_NOT_ANSWER
    return None


def answer_prompt(instruction: str, *, raw: bool) -> str:
    """What the teacher is sent to answer an instruction: the instruction itself as the user's
    message, or (a raw-completion teacher) the instruction followed by an answer cue."""
    return f"{instruction}\n\nAnswer:\n" if raw else instruction

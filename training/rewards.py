"""Rewards for online RL: what scores each completion of a rollout.

A reward function has one signature, TRL's:

    def my_reward(prompts: list[str], completions: list[str], **fields) -> list[float]: ...

`prompts` are the prompt records' `prompt` strings (not the rendered template), `completions` the
generated answers (text, end marker removed), and `fields` every other field of the prompt records
as one list per field (a record's `answer` arrives as `answer=[...]`, aligned with the
completions). It returns one finite number per completion. Functions are called with keywords,
so TRL reward functions run unchanged.

Named in the config (`reward_funcs`, each with a weight in `reward_weights`, default 1):

- `exact_answer`: 1 when the completion equals the record's `answer` after normalisation
  (`normalize_answer`: case, surrounding whitespace and punctuation, thousands separators), else 0;
- `final_number`: 1 when the last number in the completion equals the record's `answer` (a
  number), else 0: a sentence that ends with the right number counts, as graders of GSM8K-style
  tasks read answers;
- `format:REGEX`: 1 when the whole completion (stripped) matches REGEX, else 0;
- `length:N`: 1 up to N characters, then falling linearly to 0 at 2N (a soft limit on rambling);
- `path/to/file.py:function`: the user's own function, loaded from that file;
- and, with `reward_model=RUN`, a Corral reward model (a `method=reward` run directory) scoring
  each (prompt, completion) as it was trained to: DeepSpeed-Chat's third step.

Output is never trusted: a function that raises, returns the wrong count, a non-number, NaN or
infinity stops the run with one line naming the function and the cause (exit status 2).
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import ConfigError, CorralError

RewardFunction = Callable[..., Sequence[float]]


class RewardFunctionError(CorralError):
    """A reward function failed or returned something that is not one finite number per completion."""


# ---------------------------------------------------------------- built-in rewards

_EDGE_PUNCTUATION = " \t\n\r.,;:!?\"'`*()[]{}"
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def normalize_answer(text: str) -> str:
    """Lower case, inner whitespace collapsed, edge punctuation and quotes dropped, `1,000` ->
    `1000`: what `exact_answer` compares."""
    text = " ".join(str(text).split()).lower()
    return _THOUSANDS.sub("", text.strip(_EDGE_PUNCTUATION))


def exact_answer(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any], **fields: Any
) -> list[float]:
    """1.0 where the normalised completion equals the normalised `answer` field, else 0.0."""
    return [
        float(normalize_answer(completion) == normalize_answer(expected))
        for completion, expected in zip(completions, answer, strict=True)
    ]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands separators allowed), or None."""
    found = _NUMBER.findall(_THOUSANDS.sub("", str(text)))
    return float(found[-1]) if found else None


def final_number(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any], **fields: Any
) -> list[float]:
    """1.0 where the completion's last number equals the numeric `answer` field, else 0.0."""
    return [
        float(found is not None and found == last_number(str(expected)))
        for found, expected in (
            (last_number(c), a) for c, a in zip(completions, answer, strict=True)
        )
    ]


def format_reward(pattern: str) -> RewardFunction:
    """1.0 where the stripped completion matches `pattern` in full, else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def matches_format(prompts: Sequence[str], completions: Sequence[str], **fields: Any):
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return matches_format


def length_reward(limit: int) -> RewardFunction:
    """1.0 up to `limit` characters, falling linearly to 0.0 at twice the limit."""

    def within_length(prompts: Sequence[str], completions: Sequence[str], **fields: Any):
        return [max(0.0, min(1.0, 2.0 - len(c.strip()) / limit)) for c in completions]

    return within_length


# Fields of the prompt records each built-in needs (checked when the data is read).
BUILTIN_FIELDS = {"exact_answer": ("answer",), "final_number": ("answer",)}
BUILTINS = {"exact_answer": exact_answer, "final_number": final_number}


# ---------------------------------------------------------------- naming and loading


@dataclass
class Reward:
    """One reward function of a run, with its weight in the total."""

    name: str  # as the config names it: metrics are `rewards/<name>/mean`
    function: RewardFunction
    weight: float = 1.0
    needs_fields: tuple[str, ...] = ()


def load_user_function(spec: str) -> RewardFunction:
    """`path/to/file.py:function` -> the function; ConfigError naming the spec and the cause."""
    file_name, _, function_name = spec.rpartition(":")
    path = Path(file_name).expanduser()
    if not path.is_file():
        raise ConfigError(f"reward function '{spec}': file {path} not found")
    module_name = f"corral_reward_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's file is reported whole
        sys.modules.pop(module_name, None)
        raise ConfigError(
            f"reward function '{spec}': importing {path} failed: {type(exc).__name__}: {exc}"
        ) from None
    function = getattr(module, function_name, None)
    if function is None:
        raise ConfigError(f"reward function '{spec}': {path} defines no '{function_name}'")
    if not callable(function):
        raise ConfigError(f"reward function '{spec}': '{function_name}' is not callable")
    return function


def resolve_reward(spec: str) -> Reward:
    """A `reward_funcs` entry -> the reward it names (see the module docstring)."""
    spec = spec.strip()
    if spec in BUILTINS:
        return Reward(spec, BUILTINS[spec], needs_fields=BUILTIN_FIELDS[spec])
    if spec.startswith("format:"):
        pattern = spec.removeprefix("format:")
        try:
            return Reward(spec, format_reward(pattern))
        except re.error as exc:
            raise ConfigError(f"reward function '{spec}': invalid regex: {exc}") from None
    if spec.startswith("length:"):
        limit = spec.removeprefix("length:")
        if not limit.isdigit() or int(limit) < 1:
            raise ConfigError(f"reward function '{spec}': expected length:N with N >= 1 characters")
        return Reward(spec, length_reward(int(limit)))
    if ".py:" in spec:
        return Reward(spec, load_user_function(spec))
    raise ConfigError(
        f"reward function '{spec}': expected exact_answer, final_number, format:REGEX, length:N or "
        "path/to/file.py:function"
    )


def reward_model_function(run_dir: str, *, device: Any = "cpu") -> RewardFunction:
    """A Corral reward model (a method=reward run directory) as a reward function."""
    from corral.training.preference import RewardModel

    model = RewardModel.load(run_dir, device=device)

    def reward_model(prompts: Sequence[str], completions: Sequence[str], **fields: Any):
        inputs = fields.get("input")
        return model.scores(list(prompts), list(completions), inputs=inputs)

    return reward_model


def build_rewards(
    reward_funcs: Sequence[str],
    reward_weights: Sequence[float] = (),
    *,
    reward_model: str = "",
    device: Any = "cpu",
) -> list[Reward]:
    """The run's rewards: each `reward_funcs` entry, then the reward model when one is named;
    `reward_weights` gives one weight each (empty: all 1)."""
    rewards = [resolve_reward(spec) for spec in reward_funcs]
    if reward_model:
        rewards.append(Reward("reward_model", reward_model_function(reward_model, device=device)))
    if not rewards:
        raise ConfigError(
            "method grpo needs a reward: set reward_funcs (e.g. [exact_answer]) or reward_model"
        )
    if reward_weights:
        if len(reward_weights) != len(rewards):
            raise ConfigError(
                f"key 'reward_weights': {len(reward_weights)} weights for {len(rewards)} reward "
                f"functions ({', '.join(r.name for r in rewards)})"
            )
        for reward, weight in zip(rewards, reward_weights, strict=True):
            reward.weight = float(weight)
    return rewards


# ---------------------------------------------------------------- scoring


def checked_rewards(
    reward: Reward, prompts: Sequence[str], completions: Sequence[str], fields: dict[str, list]
) -> list[float]:
    """Call one reward function and check what it returned: one finite number per completion."""
    try:
        found = reward.function(prompts=list(prompts), completions=list(completions), **fields)
    except Exception as exc:  # noqa: BLE001 - the user's code: report it, whatever it raised
        raise RewardFunctionError(
            f"reward function '{reward.name}' raised {type(exc).__name__}: {exc}"
        ) from None
    if hasattr(found, "tolist"):  # a tensor or an array
        found = found.tolist()
    if not isinstance(found, list | tuple):
        raise RewardFunctionError(
            f"reward function '{reward.name}' returned {type(found).__name__}, expected a list "
            f"of {len(completions)} numbers"
        )
    if len(found) != len(completions):
        raise RewardFunctionError(
            f"reward function '{reward.name}' returned {len(found)} values for "
            f"{len(completions)} completions"
        )
    values = []
    for index, value in enumerate(found):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardFunctionError(
                f"reward function '{reward.name}' returned {value!r} "
                f"({type(value).__name__}) for completion {index}, expected a number"
            )
        if not math.isfinite(float(value)):
            raise RewardFunctionError(
                f"reward function '{reward.name}' returned {value} for completion {index}, "
                "expected a finite number"
            )
        values.append(float(value))
    return values


def score_completions(
    rewards: Sequence[Reward],
    records: Sequence[dict[str, Any]],
    completions: Sequence[str],
) -> list[list[float]]:
    """Rewards per function, each a list aligned with `completions` (records[i] is the prompt
    record of completions[i]); every value checked."""
    prompts = [record["prompt"] for record in records]
    names = sorted({key for record in records for key in record} - {"prompt"})
    fields = {name: [record.get(name) for record in records] for name in names}
    return [checked_rewards(reward, prompts, completions, fields) for reward in rewards]


def weighted_total(
    per_function: Sequence[Sequence[float]], rewards: Sequence[Reward]
) -> list[float]:
    """The reward of each completion: the weighted sum over functions."""
    return [
        sum(reward.weight * values[i] for reward, values in zip(rewards, per_function, strict=True))
        for i in range(len(per_function[0]))
    ]

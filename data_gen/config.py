"""`GenerateConfig`: every setting of `corral generate`, one help line each (the `--help` text).

Presets in configs/data_gen/ set the defaults of the two modes; `key=value` overrides win.
Pure module: no frameworks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from corral.data_gen.filters import DEFAULT_BLOCKLIST

DEFAULT_SEED_TASKS = Path(__file__).resolve().parent / "seeds" / "default_seed_tasks.jsonl"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class GenerateConfig:
    # What to make
    mode: Literal["alpaca", "self-instruct", "conversations", "preferences", "magpie", "evol"] = (
        field(
            default="alpaca",
            metadata=_help(
                "alpaca: one request asks for a list of full tasks (Stanford Alpaca); "
                "self-instruct: bootstrap, classify, instances (Wang et al.); conversations: first "
                "turns as in alpaca mode, then the teacher plays the user for follow-ups and answers "
                "them (self-chat); the output is ShareGPT JSON; preferences: answers to the "
                "instructions of preference_prompts, judged in pairs, written as {prompt, chosen, "
                "rejected} for DPO; magpie: the teacher writes the user's turn from its chat "
                "template's pre-query prefix, then answers it; evol: seed instructions rewritten "
                "harder (in depth) or into new ones (in breadth) over several generations"
            ),
        )
    )
    turns: int = field(
        default=3, metadata=_help("conversations mode: user turns per conversation, at most")
    )
    seed_tasks: str = field(
        default="",
        metadata={
            **_help(
                "seed tasks: Self-Instruct JSONL or Alpaca records; empty = Corral's own set (in "
                "a preset, a relative path is found beside the preset first)"
            ),
            "input_path": True,
        },
    )
    eval_set: str = field(
        default="",
        metadata={
            **_help(
                "an evaluation set to keep out of the data: a task whose instruction is within "
                "ROUGE-L 0.7 of an item, or that shares a 13-gram with one, is dropped "
                "(reason contaminated)"
            ),
            "input_path": True,
        },
    )
    preference_prompts: str = field(
        default="",
        metadata={
            **_help("preferences mode: the Alpaca (or Dolly) records whose instructions to answer"),
            "input_path": True,
        },
    )
    answer_sources: list[str] = field(
        default_factory=lambda: ["teacher"],
        metadata=_help(
            "preferences mode: who answers: `teacher`, and/or a model or run directory (a tuned "
            "model, answering in its own template); one source gives two samples per prompt"
        ),
    )
    judge: str = field(
        default="",
        metadata=_help("preferences mode: a local model as judge (default: the teacher judges)"),
    )
    judge_base_url: str = field(
        default="", metadata=_help("preferences mode: an OpenAI-compatible endpoint as judge")
    )
    judge_model: str = field(
        default="", metadata=_help("preferences mode: model at judge_base_url")
    )
    num_instructions: int = field(
        default=100, metadata=_help("stop when this many new instructions are kept")
    )
    output: str = field(
        default="data/generated/alpaca_data.json",
        metadata=_help("final Alpaca JSON; the journal and manifest are written beside it"),
    )
    seed: int = field(default=42, metadata=_help("random seed for demonstration sampling"))

    # The teacher
    teacher: Literal["local", "openai"] = field(
        default="local",
        metadata=_help(
            "local: a transformers model on this machine; openai: any "
            "OpenAI-compatible endpoint (implied by base_url)"
        ),
    )
    model: str = field(
        default="embedded",
        metadata=_help("teacher model: a local name/folder, or the endpoint's model id"),
    )
    base_url: str = field(
        default="", metadata=_help("OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    )
    api: Literal["chat", "completions", "batch"] = field(
        default="chat",
        metadata=_help(
            "chat: prompt sent as a user message; completions: raw text to continue; batch: "
            "chat requests through OpenAI's Batch API (half price; each round is one batch, "
            "journaled, so a resumed run polls it instead of paying again)"
        ),
    )
    batch_poll_seconds: float = field(
        default=30.0, metadata=_help("api=batch: seconds between polls of a batch's status")
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata=_help("environment variable holding the API key")
    )
    concurrency: int = field(default=8, metadata=_help("requests in flight at once (endpoint)"))
    max_retries: int = field(
        default=6, metadata=_help("retries per request on 429, 5xx, timeouts, malformed replies")
    )
    request_timeout: float = field(default=120.0, metadata=_help("seconds per request attempt"))
    teacher_patience: float = field(
        default=60.0,
        metadata=_help(
            "stop the run when the teacher has given no usable answer for this many seconds of "
            "waiting (a hung or failing endpoint); 0 = never. Raise it above the time one answer "
            "takes on a slow endpoint"
        ),
    )
    max_failures_in_a_row: int = field(
        default=0,
        metadata=_help(
            "stop the run when this many request attempts in a row failed (HTTP 5xx, timeouts, "
            "malformed replies; 429s are waited out); 0 = 4 x concurrency, at least 16"
        ),
    )
    backoff_base: float = field(
        default=0.5, metadata=_help("first retry waits about this long (s); doubles per retry")
    )
    backoff_cap: float = field(default=30.0, metadata=_help("longest wait between retries (s)"))
    price_per_1k_prompt_tokens: float = field(
        default=0.0, metadata=_help("USD per 1K prompt tokens, for the cost estimate")
    )
    price_per_1k_completion_tokens: float = field(
        default=0.0, metadata=_help("USD per 1K completion tokens, for the cost estimate")
    )
    local_batch_size: int = field(
        default=8, metadata=_help("prompts generated together by a local teacher")
    )
    repetition_penalty: float = field(
        default=1.0, metadata=_help("local teacher only: transformers repetition penalty")
    )
    local_dtype: str = field(
        default="auto",
        metadata=_help(
            "local teacher only: auto (bf16 on GPUs and CPUs with native bf16, about twice as "
            "fast; fp32 elsewhere), float32 or bfloat16"
        ),
    )
    requests_per_batch: int = field(
        default=0,
        metadata=_help(
            "prompts per round (each round is journaled); 0 = concurrency for an "
            "endpoint, local_batch_size for a local model"
        ),
    )

    # Sampling of the task-writing requests
    temperature: float = field(default=1.0, metadata=_help("sampling temperature"))
    top_p: float = field(default=1.0, metadata=_help("nucleus sampling"))
    max_tokens: int = field(default=3072, metadata=_help("completion tokens per request"))
    presence_penalty: float = field(default=0.0, metadata=_help("endpoint presence penalty"))
    num_prompt_instructions: int = field(
        default=3, metadata=_help("alpaca: seed demonstrations per prompt")
    )
    tasks_per_request: int = field(
        default=20, metadata=_help("alpaca: list length asked for (stop after this item)")
    )

    # Self-Instruct steps
    num_human_demos: int = field(
        default=6, metadata=_help("self-instruct: seed instructions per bootstrap prompt")
    )
    num_machine_demos: int = field(
        default=2, metadata=_help("self-instruct: generated instructions per bootstrap prompt")
    )
    max_bootstrap_tasks: int = field(
        default=16, metadata=_help("self-instruct: stop the bootstrap list at this task number")
    )
    classification_examples: int = field(
        default=31, metadata=_help("self-instruct: few-shot examples for 'Is it classification?'")
    )
    instance_examples: int = field(
        default=3, metadata=_help("self-instruct: seed tasks shown when asking for instances")
    )
    instance_max_tokens: int = field(
        default=350, metadata=_help("self-instruct: completion tokens for the instances of a task")
    )
    instance_temperature: float = field(
        default=0.0, metadata=_help("self-instruct: temperature of classification and instances")
    )
    instance_presence_penalty: float = field(
        default=1.5, metadata=_help("self-instruct: endpoint presence penalty for instances")
    )
    max_instances: int = field(
        default=5, metadata=_help("self-instruct: instances kept per instruction at most")
    )

    # Magpie and Evol-Instruct
    system_prompt: str = field(
        default="", metadata=_help("magpie: a system message that steers the questions' domain")
    )
    magpie_turns: int = field(
        default=1,
        metadata=_help("magpie: user turns per conversation; above 1 the output is ShareGPT"),
    )
    magpie_tokenizer: str = field(
        default="",
        metadata=_help(
            "magpie: tokenizer (folder or model name) whose chat template gives the pre-query "
            "prefix; empty = the teacher model's own"
        ),
    )
    query_max_tokens: int = field(
        default=256,
        metadata=_help("magpie: completion tokens for a user turn; evol: for a rewrite"),
    )
    max_repetition: float = field(
        default=0.5,
        metadata=_help("magpie: drop a turn whose share of repeated word 3-grams exceeds this"),
    )
    language: Literal["en", ""] = field(
        default="en", metadata=_help("magpie: keep questions that read as English; '' keeps any")
    )
    evol_generations: int = field(
        default=3,
        metadata=_help("evol: an instruction evolved this many times is not evolved again"),
    )
    evol_operations: list[str] = field(
        default_factory=lambda: [
            "add_constraints",
            "deepen",
            "concretize",
            "increase_reasoning",
            "complicate_input",
            "breadth",
        ],
        metadata=_help("evol: the operations drawn from, uniformly (in depth, and breadth)"),
    )
    keep_reasoning: bool = field(
        default=True,
        metadata=_help(
            "magpie, evol: a reasoning teacher's thinking (reasoning_content, or <think>...</think>) "
            "goes to the record's `reasoning` field; false drops it (never left in the output)"
        ),
    )
    evol_min_new_words: int = field(
        default=3,
        metadata=_help(
            "evol: fewer new content words than this vs the parent is no information gain"
        ),
    )

    # Filters
    rouge_threshold: float = field(
        default=0.7,
        metadata=_help("drop an instruction whose ROUGE-L F vs any kept one exceeds this"),
    )
    min_instruction_words: int = field(default=4, metadata=_help("shortest instruction kept"))
    max_instruction_words: int = field(default=150, metadata=_help("longest instruction kept"))
    blocklist: list[str] = field(
        default_factory=lambda: list(DEFAULT_BLOCKLIST),
        metadata=_help("whole words/phrases that drop an instruction (case-insensitive)"),
    )
    max_idle_rounds: int = field(
        default=50, metadata=_help("give up after this many rounds in a row keep nothing")
    )

    def __post_init__(self) -> None:
        if self.base_url:
            self.teacher = "openai"
        if self.num_instructions < 1:
            raise ValueError("num_instructions must be at least 1")
        if self.mode == "magpie":
            if self.api == "batch":
                raise ValueError("magpie mode needs raw completions; the Batch API sends chat")
            self.api = "completions"  # the teacher continues its own template's text
        from corral.data_gen.evol import OPERATIONS

        unknown = sorted(set(self.evol_operations) - set(OPERATIONS))
        if unknown or not self.evol_operations:
            raise ValueError(f"evol_operations: choose from {', '.join(OPERATIONS)}, got {unknown}")
        if self.magpie_turns < 1 or self.evol_generations < 1:
            raise ValueError("magpie_turns and evol_generations must be at least 1")
        if self.turns < 1:
            raise ValueError("turns must be at least 1")
        if not 0.0 <= self.rouge_threshold <= 1.0:
            raise ValueError("rouge_threshold must be within [0, 1]")
        for name in ("price_per_1k_prompt_tokens", "price_per_1k_completion_tokens"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.teacher_patience < 0 or self.max_failures_in_a_row < 0:
            raise ValueError("teacher_patience and max_failures_in_a_row must be 0 or more")
        if self.concurrency < 1 or self.local_batch_size < 1:
            raise ValueError("concurrency and local_batch_size must be at least 1")
        if self.local_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(
                f"local_dtype must be auto, float32 or bfloat16, got {self.local_dtype!r}"
            )
        if (
            self.num_prompt_instructions < 1
            or self.tasks_per_request <= self.num_prompt_instructions
        ):
            raise ValueError("tasks_per_request must exceed num_prompt_instructions (>= 1)")

    def seed_tasks_path(self) -> Path:
        return Path(self.seed_tasks) if self.seed_tasks else DEFAULT_SEED_TASKS

    def rounds_size(self) -> int:
        if self.requests_per_batch > 0:
            return self.requests_per_batch
        return self.concurrency if self.teacher == "openai" else self.local_batch_size

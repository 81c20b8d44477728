"""Sampling settings of one generation request, checked once where requests come in. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows (OpenAI: 5 on legacy completions)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. `temperature == 0` is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the generation (EOS, end marker)
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence of a token
    # transformers' repetition penalty (CTRL): a token already in the prompt or the answer has its
    # logit divided by this when positive, multiplied when negative; 1.0 = off.
    repetition_penalty: float = 1.0
    # Log-probabilities of the model's own distribution (before temperature and penalties):
    logprobs: int | None = None  # per generated token, with this many most likely alternatives
    prompt_logprobs: int | None = None  # per prompt token (echo), with this many alternatives

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError("stop sequences must be strings")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be above 0, got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}")

    @property
    def adjusts_logits(self) -> bool:
        return (
            bool(self.logit_bias)
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

"""The settings of `corral serve`, as a dataclass config (YAML preset + flags + key=value)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServeConfig:
    model: str | None = field(
        default=None,
        metadata={"help": "model to serve: embedded, a folder (merged models too) or a hub id"},
    )
    run: str | None = field(
        default=None,
        metadata={"help": "training run directory to serve (base + adapter, with its template)"},
    )
    template: str | None = field(
        default=None, metadata={"help": "prompt template for a plain model (a run uses its own)"}
    )
    served_model_name: str | None = field(
        default=None,
        metadata={
            "help": "model id clients send (default: the model name or the run's folder name)"
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    api_key: str | None = field(
        default=None,
        metadata={"help": "require 'Authorization: Bearer KEY' (or set CORRAL_API_KEY)"},
    )
    quantization: str | None = field(
        default=None, metadata={"help": "nf4 to load the weights in 4 bits (bitsandbytes)"}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on capable GPUs, fp32 on CPU), float32, bfloat16 or float16"},
    )
    max_batch_size: int = field(
        default=16, metadata={"help": "requests generated together in one forward pass"}
    )
    default_max_tokens: int = field(
        default=256, metadata={"help": "chat answer length when a request sets no max_tokens"}
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads for decode steps (default: all of torch's but one, which the "
            "HTTP server keeps; prompts are prefilled on all)"
        },
    )
    max_request_bytes: int = field(
        default=1_000_000, metadata={"help": "larger request bodies get 413"}
    )
    max_prompts_per_request: int = field(
        default=2048,
        metadata={
            "help": "prompts one /v1/completions request may hold (OpenAI's cap); more get 400"
        },
    )

    def __post_init__(self) -> None:
        if self.quantization not in (None, "nf4"):
            raise ValueError(f"quantization must be nf4 or unset, got {self.quantization!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_prompts_per_request < 1:
            raise ValueError("max_prompts_per_request must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be at least 1")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")

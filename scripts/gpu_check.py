"""Is this GPU machine ready for Corral? Runs Corral's own entry points and reports JSON.

    scripts/gpu_check.sh [--model embedded|FOLDER|HUB_ID] [--dry-run] [--gpus N] [--skip STEP]
                         [--workdir DIR] [--time-limit SECONDS] [--output FILE]

Steps, each a subprocess with a time limit (a failing step is reported with the tail of its
stderr and the check goes on; the exit status is 1 if any step failed):

- probe: the GPUs (name, memory, compute capability, bf16), library versions, and a bf16 matmul
  measured on each GPU (the achievable peak, beside the datasheet figure);
- lora: `accelerate launch train.py --config configs/training/alpaca_lora_7b.yaml` with the model
  and a short run as key=value overrides, bf16, on one GPU;
- qlora: the same with configs/training/qlora_7b.yaml (NF4 + double quantization, paged AdamW,
  gradient checkpointing), on one GPU;
- fsdp (2+ GPUs): configs/accelerate/fsdp.yaml (FSDP2) with configs/training/alpaca_full_7b.yaml:
  6 steps with sharded checkpoints at 3 and 6; then checkpoint-6 is deleted (a crash after step
  3's checkpoint) and the same command with resume=auto must continue from step 3 and reach the
  losses of the uninterrupted run;
- serve: benchmarks/serve_throughput.py (`corral serve` + the openai client, 1 vs 8 streams), and
  `corral serve --run` on the LoRA run answering one chat request.

Every training example is exactly `max_length` tokens (synthetic records cut with
truncation=truncate), so micro-batches are exactly the "4 x 256 tokens" the README's memory
arithmetic assumes.

How things are measured:
- peak memory: torch.cuda.max_memory_allocated in every training process. The launched script is
  this file in worker mode: it runs train.py's entry point with a training callback that only
  observes (training/callbacks.py: after setup, around each step), so the peak after loading
  (weights) and the peak while training are told apart. nvidia-smi's memory.used is sampled every 0.5 s beside it
  (that includes the CUDA context, the allocator's cache and any other process on the card);
- tokens/s: non-padding tokens of the optimizer steps over their time (CUDA-synchronised around
  each step), the first 2 steps of each launch left out as warm-up;
- MFU: model FLOPs per token (below) x tokens/s / (peak bf16 FLOPs x GPUs), against the datasheet
  peak and against the matmul measured in the same run.

Model FLOPs per trained token (N_mm: every weight that multiplies, the vocabulary projection
included, the embedding lookup not; L layers; d = heads x head_dim; l = the example's length;
recomputation under gradient checkpointing is not counted, as MFU requires):
- full fine-tuning: 6 N_mm (forward 2, backward 4) + 12 L d l (attention scores and values);
- LoRA / QLoRA: 4 N_mm (forward 2 + input gradients 2; frozen weights need no weight gradient)
  + 6 N_adapter + 12 L d l.
Corral projects onto the vocabulary only where a token is trained, so it does a little less work
than this counts. The JSON also gives the 6 N convention (N = all parameters) many LoRA
benchmarks use.

With no CUDA device (or --dry-run) nothing runs: the JSON holds the plan (every command line, each
training command checked by Corral's config loader) and the arithmetic expectations, with
"gpu": null; the exit status is 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GB = 1e9  # decimal gigabytes, as the README's table
WARMUP_STEPS = 2  # left out of tokens/s: kernel selection, allocator growth
RESUME_LOSS_TOLERANCE = 0.02  # bf16 on GPUs: kernels and collectives are not bit-deterministic
SMALL_MODEL_PARAMETERS = 1e9

# Datasheet dense bf16 tensor-core peak (no sparsity; GeForce cards with fp32 accumulation) and
# memory bandwidth, matched against torch.cuda.get_device_name(). Unknown cards get null here
# and are judged by the matmul measured in the same run.
GPU_TABLE: list[tuple[str, str, float, float]] = [
    (r"H100.*PCIe", "H100 PCIe", 756.0, 2000.0),
    (r"H100.*(HBM3|SXM)", "H100 SXM", 989.0, 3350.0),
    (r"H200", "H200", 989.0, 4800.0),
    (r"A100.*80GB.*PCIe", "A100 80GB PCIe", 312.0, 1935.0),
    (r"A100.*80GB", "A100 SXM 80GB", 312.0, 2039.0),
    (r"A100", "A100 40GB", 312.0, 1555.0),
    (r"L40S", "L40S", 362.0, 864.0),
    (r"L40\b", "L40", 181.0, 864.0),
    (r"\bL4\b", "L4", 121.0, 300.0),
    (r"A10G", "A10G", 125.0, 600.0),
    (r"\bA10\b", "A10", 125.0, 600.0),
    (r"RTX 4090", "RTX 4090", 165.0, 1008.0),
    (r"RTX 3090", "RTX 3090", 71.0, 936.0),
    (r"RTX A6000", "RTX A6000", 155.0, 768.0),
    (r"\bA40\b", "A40", 150.0, 696.0),
]
REFERENCE_GPU = "NVIDIA A100-SXM4-80GB"  # the anchors' card; the dry run's expectations use it

# MFU of LoRA fine-tuning a 7B on one A100, from LLaMA-Factory's comparison table (as quoted in
# Corral's issue; their FLOP-counting convention is not restated there).
ANCHORS = {
    "hf_lora_a100": {"mfu": 0.207, "what": "Hugging Face LoRA, A100 (LLaMA-Factory's table)"},
    "unsloth_a100": {"mfu": 0.346, "what": "Unsloth LoRA, A100 (LLaMA-Factory's table)"},
}

# The published configuration of LLaMA-7B / Llama-2-7B, for a dry run on a machine without the hub.
LLAMA_7B_CONFIG = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "tie_word_embeddings": False,
}
KNOWN_CONFIGS = {
    name: LLAMA_7B_CONFIG
    for name in (
        "meta-llama/Llama-2-7b-hf",
        "meta-llama/Llama-2-7b-chat-hf",
        "huggyllama/llama-7b",
        "NousResearch/Llama-2-7b-hf",
    )
}
# README, Stage 2: "Expected GPU memory of the 7B presets" (estimates, per GPU).
README_7B_TABLE = {
    "lora": "alpaca_lora_7b: ~20 GB (~15.5 GB with gradient checkpointing)",
    "qlora": "qlora_7b: ~9-10 GB",
    "fsdp": "alpaca_full_7b on 8 GPUs: ~26 GB",
}

# ------------------------------------------------------------------------------ arithmetic


@dataclass(frozen=True)
class Architecture:
    """The numbers of a LLaMA-architecture config that memory and FLOPs depend on."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Architecture:
        needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        missing = [key for key in (*needed, "num_attention_heads") if not config.get(key)]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        heads = int(config["num_attention_heads"])
        return cls(
            vocab=int(config["vocab_size"]),
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def quantized_params(self) -> int:
        """What NF4 quantizes: the decoder layers' linear weights."""
        return self.layers * self.layer_linear_params

    @property
    def unquantized_params(self) -> int:
        """Embeddings, the untied lm_head and the norms: kept in fp32 under QLoRA."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + (2 * self.layers + 1) * self.hidden

    @property
    def parameters(self) -> int:
        return self.quantized_params + self.unquantized_params

    @property
    def matmul_params(self) -> int:
        """Weights that multiply per token: the layers' linears and the vocabulary projection."""
        return self.quantized_params + self.vocab * self.hidden

    def lora_params(self, rank: int, targets: list[str]) -> int:
        shapes = self.linear_shapes()
        names = list(shapes) if [t.lower() for t in targets] == ["all-linear"] else targets
        return self.layers * sum(rank * sum(shapes[name]) for name in names if name in shapes)


# Bytes per token per layer of 16-bit activations kept for backward (Korthikanti et al. 2022,
# without the s^2 attention term that SDPA/flash attention never stores).
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 34
# fp32 logits, their log-softmax and its gradient, per position and vocabulary entry.
LOGIT_BYTES = 12
# CUDA context, cuBLAS workspaces and allocator slack: on the card, not in max_memory_allocated.
OVERHEAD_GB = 1.3


def memory_arithmetic(
    arch: Architecture,
    *,
    method: str,
    micro_batch_size: int,
    max_length: int,
    gradient_checkpointing: bool,
    lora_r: int = 8,
    lora_targets: list[str] | None = None,
    world: int = 1,
) -> dict[str, Any]:
    """Expected peak GPU memory per process, the README's Stage 2 arithmetic for any config.

    Components are tensors (compare with torch.cuda.max_memory_allocated); `total_gb` adds the
    fixed overhead (compare with nvidia-smi). Decimal GB.
    """
    tokens = micro_batch_size * max_length
    h, layers = arch.hidden, arch.layers
    parts: dict[str, float] = {}
    notes: dict[str, str] = {}
    lora = arch.lora_params(lora_r, lora_targets or ["q_proj", "v_proj"])
    if method == "full":
        parts["weights_grads_adam_fp32"] = arch.parameters * 16 / world
        notes["weights_grads_adam_fp32"] = (
            f"{arch.parameters / 1e9:.3g}B x 16 B = {arch.parameters * 16 / GB:.1f} GB"
            + (f", sharded / {world}" if world > 1 else "")
        )
        if world > 1:
            parts["gathered_layers_bf16"] = 2 * arch.layer_linear_params * 2
            notes["gathered_layers_bf16"] = "the layer computing and the one prefetched, bf16"
    elif method == "lora":
        parts["base_weights_bf16"] = arch.parameters * 2
        notes["base_weights_bf16"] = f"{arch.parameters / 1e9:.3g}B x 2 B"
    elif method == "qlora":
        parts["nf4_weights"] = arch.quantized_params * 0.5
        notes["nf4_weights"] = f"{arch.quantized_params / 1e9:.3g}B x 0.5 B"
        # One 8-bit absmax per 64 weights, and one fp32 constant per 256 of those.
        parts["double_quant_constants"] = arch.quantized_params * (1 / 64 + 4 / (64 * 256))
        parts["embeddings_lm_head_norms_fp32"] = arch.unquantized_params * 4
        notes["embeddings_lm_head_norms_fp32"] = f"{arch.unquantized_params / 1e6:.0f}M x 4 B"
    else:
        raise ValueError(f"method must be full, lora or qlora, got {method!r}")
    if method in ("lora", "qlora"):
        parts["lora_weights_grads_adam"] = lora * 16
        notes["lora_weights_grads_adam"] = f"{lora / 1e6:.1f}M x 16 B (fp32 weight, grad, Adam)"
    if gradient_checkpointing:
        parts["activations_checkpointed"] = 2 * tokens * h * layers
        notes["activations_checkpointed"] = f"each layer's bf16 input, {tokens} tokens"
        parts["activations_recomputed_layer"] = ACTIVATION_BYTES_PER_TOKEN_HIDDEN * tokens * h
    else:
        parts["activations"] = ACTIVATION_BYTES_PER_TOKEN_HIDDEN * tokens * h * layers
        notes["activations"] = (
            f"{ACTIVATION_BYTES_PER_TOKEN_HIDDEN} x {tokens} tokens x {h} B x {layers} layers"
        )
    parts["logits"] = tokens * arch.vocab * LOGIT_BYTES
    notes["logits"] = f"{tokens} tokens x {arch.vocab} x {LOGIT_BYTES} B (fp32, log-softmax, grad)"
    tensors = sum(parts.values()) / GB
    return {
        "method": method,
        "world": world,
        "tokens_per_forward": tokens,
        "parameters": arch.parameters,
        "lora_parameters": lora if method != "full" else 0,
        "components_gb": {name: round(value / GB, 4) for name, value in parts.items()},
        "notes": notes,
        "tensors_gb": round(tensors, 3),
        "overhead_gb": OVERHEAD_GB,
        "total_gb": round(tensors + OVERHEAD_GB, 3),
    }


def flops_per_token(
    arch: Architecture, *, method: str, adapter_params: int, context: float
) -> dict[str, Any]:
    """Model FLOPs per trained token (see the module docstring), at mean attention context l."""
    attention = 12 * arch.layers * arch.heads * arch.head_dim * context
    if method == "full":
        weights, formula = 6 * arch.matmul_params, "6*N_mm + 12*L*d*l"
    else:
        weights = 4 * arch.matmul_params + 6 * adapter_params
        formula = "4*N_mm + 6*N_adapter + 12*L*d*l"
    return {
        "formula": formula,
        "N_mm": arch.matmul_params,
        "N_adapter": adapter_params if method != "full" else 0,
        "L": arch.layers,
        "d": arch.heads * arch.head_dim,
        "l": round(context, 1),
        "flops_per_token": weights + attention,
        "six_n_flops_per_token": 6 * arch.parameters,
    }


def gpu_specs(name: str) -> dict[str, Any] | None:
    for pattern, label, tflops, bandwidth in GPU_TABLE:
        if re.search(pattern, name):
            return {"table_name": label, "bf16_tflops": tflops, "memory_gb_per_s": bandwidth}
    return None


def tokens_per_s_at(mfu: float, flops: float, tflops: float, gpus: int) -> float:
    return mfu * tflops * 1e12 * gpus / flops


# ------------------------------------------------------------------------------ worker modes


def probe() -> dict[str, Any]:
    """GPUs, versions, and a bf16 matmul measured on each GPU (run in its own process)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [],
        "versions": {},
    }
    for package in ("transformers", "accelerate", "peft", "bitsandbytes"):
        try:
            info["versions"][package] = version(package)
        except PackageNotFoundError:
            info["versions"][package] = None
    if not torch.cuda.is_available():
        return info
    try:
        nccl = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception:  # noqa: BLE001 - a build without NCCL: the FSDP step will say more
        info["nccl"] = None
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        bf16 = props.major >= 8
        info["devices"].append(
            {
                "index": index,
                "name": props.name,
                "memory_gb": round(props.total_memory / GB, 2),
                "capability": f"{props.major}.{props.minor}",
                "bf16": bf16,
                "measured_bf16_tflops": None,
            }
        )
        if bf16:
            try:
                info["devices"][-1]["measured_bf16_tflops"] = round(measure_matmul(index), 1)
            except RuntimeError as exc:  # e.g. the card is full: the table still gives a peak
                info["devices"][-1]["matmul_error"] = str(exc).splitlines()[0][:200]
    return info


def measure_matmul(index: int, n: int = 8192, iterations: int = 30) -> float:
    """TFLOPS of a bf16 n x n x n matmul on one GPU: the peak this card reaches in practice."""
    import torch

    device = torch.device("cuda", index)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(iterations):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000
    return 2 * n**3 * iterations / seconds / 1e12


def train_worker(record_dir: Path, train_argv: list[str]) -> None:
    """Run train.py's entry point in this (accelerate-launched) process and record what it did.

    A callback observes, never changes: the run's optimizer, quantization and sharding after
    setup; per step its tokens, loss, time and the CUDA allocator's peak. The record is written
    even when the run fails.
    """
    import torch
    from corral.training.callbacks import TrainingCallback
    from corral.training.commands import main as train_main

    rank = int(os.environ.get("RANK") or 0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0)) if cuda else None
    record: dict[str, Any] = {"rank": rank, "setup": None, "steps": [], "memory": {}}
    started = time.monotonic()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    class Recorder(TrainingCallback):
        def on_setup(self, run: Any) -> None:
            record["setup"] = describe_run(run)
            record["setup"]["seconds"] = round(time.monotonic() - started, 2)
            if cuda:
                torch.cuda.synchronize(device)
                record["memory"]["after_setup_allocated_gb"] = (
                    torch.cuda.memory_allocated(device) / GB
                )
                record["memory"]["load_peak_allocated_gb"] = (
                    torch.cuda.max_memory_allocated(device) / GB
                )
                torch.cuda.reset_peak_memory_stats(device)

        def on_step_begin(self, run: Any, batches: list) -> None:
            if cuda:
                torch.cuda.synchronize(device)
            self.began = time.perf_counter()

        def on_step_end(self, run: Any, result: Any, batches: list) -> None:
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - self.began
            sum_sq = local_tokens = 0
            for batch in batches:
                ids = batch.get("example_ids")  # SFT batches; absent, attention goes uncounted
                if ids is None:
                    continue
                counts = torch.unique(ids[ids >= 0], return_counts=True)[1].long()
                sum_sq += int((counts * counts).sum())
                local_tokens += int(counts.sum())
            record["steps"].append(
                {
                    "step": run.step,
                    "loss": result.loss,
                    "tokens": result.tokens,
                    "local_tokens": local_tokens,
                    "local_sum_sq_lengths": sum_sq,
                    "seconds": seconds,
                    "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / GB
                    if cuda
                    else None,
                }
            )

    code: Any = 1
    try:
        code = train_main(train_argv[1:], callbacks=[Recorder()])
    finally:
        record["exit_code"] = code
        record["seconds"] = round(time.monotonic() - started, 2)
        if cuda:
            record["memory"]["after_setup_peak_allocated_gb"] = (
                torch.cuda.max_memory_allocated(device) / GB
            )
            record["memory"]["after_setup_peak_reserved_gb"] = (
                torch.cuda.max_memory_reserved(device) / GB
            )
        record_dir.mkdir(parents=True, exist_ok=True)
        tmp = record_dir / f".rank{rank}.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(record_dir / f"rank{rank}.json")
    if code:
        raise SystemExit(code)


def describe_run(run: Any) -> dict[str, Any]:
    """What setup built: precision, optimizer, quantization, sharding, resume point."""
    from collections import Counter

    import torch

    accelerator = run.accelerator
    model = accelerator.unwrap_model(run.model)
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
    frozen: Counter = Counter()
    trainable: Counter = Counter()
    for param in model.parameters():
        (trainable if param.requires_grad else frozen)[str(param.dtype)] += param.numel()
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization is not None and hasattr(quantization, "to_dict"):
        quantization = quantization.to_dict()
    if isinstance(quantization, dict):
        keys = (
            "quant_method",
            "load_in_4bit",
            "bnb_4bit_quant_type",
            "bnb_4bit_use_double_quant",
            "bnb_4bit_compute_dtype",
        )
        quantization = {key: quantization.get(key) for key in keys}
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "device_name": torch.cuda.get_device_name(accelerator.device)
        if accelerator.device.type == "cuda"
        else None,
        "optimizer": type(optimizer).__name__,
        "trainable_parameters": run.trainable_parameters,
        "frozen_dtypes": dict(frozen),
        "trainable_dtypes": dict(trainable),
        "quantization": quantization,
        "linear4bit_modules": sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit"),
        "fsdp_version": getattr(plugin, "fsdp_version", None) if plugin is not None else None,
        "dtensor_parameters": any(type(p).__name__ == "DTensor" for p in run.model.parameters()),
        "gradient_checkpointing": any(
            getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
        ),
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
        "start_step": run.step,
        "total_steps": run.total_steps,
    }


# ------------------------------------------------------------------------------ the plan


@dataclass
class Command:
    argv: list[str]
    timeout: float
    what: str
    record_dir: Path | None = None  # training launches: where the worker writes rank records

    def as_json(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "argv": self.argv,
            "shell": shlex.join(self.argv),
            "timeout_s": round(self.timeout),
        }


@dataclass
class Step:
    name: str
    what: str
    commands: list[Command] = field(default_factory=list)
    runs_when: str = "a CUDA device is present"
    between: str | None = None  # what the check itself does between two commands
    expectations: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None


def display(path: Path | str) -> str:
    """A path as the plan shows it: relative to the repository when inside it (symlinks kept:
    a venv's python is a symlink that must stay the venv's)."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def accelerate_executable() -> str:
    beside = Path(sys.executable).with_name("accelerate")
    return display(beside) if beside.exists() else (shutil.which("accelerate") or "accelerate")


TRAIN_STEPS = {"lora": 20, "qlora": 20}
BF16_GPU = "a CUDA device with bf16 (compute capability 8.0 or newer)"
FSDP_STEPS, FSDP_CHECKPOINT_AT = 6, 3


def common_overrides(model: str, data: Path, out: Path) -> list[str]:
    return [
        f"model={model}",
        f"data={display(data)}",
        f"output_dir={display(out)}",
        "truncation=truncate",  # every example exactly max_length tokens
        "gradient_accumulation_steps=1",
        "report_to=[none]",
        "overwrite_output_dir=true",
    ]


def launch_argv(
    accelerate_config: str, record_dir: Path, preset: str, overrides: list[str], gpus: int = 1
) -> list[str]:
    argv = [accelerate_executable(), "launch", "--config_file", accelerate_config]
    if gpus > 1:
        argv += ["--num_processes", str(gpus), "--main_process_port", str(free_port())]
    return [
        *argv,
        display(Path(__file__)),
        "--train-worker",
        display(record_dir),
        "train.py",
        "--config",
        preset,
        *overrides,
    ]


def build_plan(args: argparse.Namespace, model: str, workdir: Path, gpus: int) -> list[Step]:
    from corral.rundir import RunDir

    data = workdir / "data" / "gpu_check_alpaca.json"
    small = args.time_limit <= 900
    train_timeout = 300 if small else 1200
    steps = [
        Step(
            "probe",
            "GPUs, versions, bf16 matmul TFLOPS on each GPU",
            [Command([display(sys.executable), display(Path(__file__)), "--probe"], 180, "probe")],
            runs_when="always (decides whether anything else runs)",
        )
    ]
    for name, preset, extra in (
        ("lora", "configs/training/alpaca_lora_7b.yaml", ["precision=bf16"]),
        ("qlora", "configs/training/qlora_7b.yaml", []),
    ):
        out = workdir / name
        overrides = [
            *common_overrides(model, data, out),
            f"max_steps={TRAIN_STEPS[name]}",
            "val_size=8",
            *extra,
        ]
        argv = launch_argv(
            "configs/accelerate/single_device.yaml",
            out.with_name(name + "_ranks"),
            preset,
            overrides,
        )
        command = Command(argv, train_timeout, f"{name}: {TRAIN_STEPS[name]} steps on GPU 0")
        command.record_dir = out.with_name(name + "_ranks")
        what = (
            "bf16 LoRA (alpaca_lora_7b: r 8 on q/v, micro-batch 4 x 256 tokens), one GPU"
            if name == "lora"
            else "QLoRA (qlora_7b: NF4 + double quant, bf16 compute, r 64 all-linear, paged "
            "AdamW, gradient checkpointing, micro-batch 4 x 512 tokens), one GPU"
        )
        steps.append(Step(name, what, [command], runs_when=BF16_GPU))

    out = workdir / "fsdp"
    base = [
        *common_overrides(model, data, out),
        f"max_steps={FSDP_STEPS}",
        f"save_steps={FSDP_CHECKPOINT_AT}",
        "lr_scheduler=constant",  # the same schedule whatever the resume point
        "warmup_ratio=0",
    ]
    fsdp_commands = []
    for label, overrides in (
        (f"fsdp: {FSDP_STEPS} steps, sharded checkpoints at 3 and 6", base),
        (
            "fsdp: after deleting checkpoint-6, resume=auto from checkpoint-3",
            [*base, "resume=auto"],
        ),
    ):
        record_dir = workdir / ("fsdp_ranks" if "resume" not in label else "fsdp_resume_ranks")
        argv = launch_argv(
            "configs/accelerate/fsdp.yaml",
            record_dir,
            "configs/training/alpaca_full_7b.yaml",
            overrides,
            gpus=max(gpus, 2),
        )
        fsdp_commands.append(Command(argv, train_timeout * 2, label, record_dir))
    steps.append(
        Step(
            "fsdp",
            f"FSDP2 full fine-tune (alpaca_full_7b: bf16 over fp32 master weights, micro-batch "
            f"4 x 512 tokens per GPU) on {max(gpus, 2)} GPUs; sharded checkpoint; resume=auto "
            "continues exactly",
            fsdp_commands,
            runs_when=f"2 or more GPUs; {BF16_GPU}",
            between=f"delete {display(RunDir(out).checkpoint(FSDP_STEPS))} (a crash "
            f"after checkpoint-{FSDP_CHECKPOINT_AT} was written), then resume; the resumed "
            f"losses of steps {FSDP_CHECKPOINT_AT + 1}-{FSDP_STEPS} must match the first "
            f"launch's within {RESUME_LOSS_TOLERANCE}",
        )
    )
    serve_port = free_port()
    steps.append(
        Step(
            "serve",
            "serving throughput (corral serve + openai client, 1 vs 8 streams, 128 tokens each) "
            "and the LoRA run served with `corral serve --run`",
            [
                Command(
                    [
                        display(sys.executable),
                        "benchmarks/serve_throughput.py",
                        "--model",
                        model,
                        "--max-tokens",
                        "128",
                        "--concurrency",
                        "8",
                    ],
                    600,
                    "serve: benchmarks/serve_throughput.py",
                ),
                Command(
                    [
                        display(sys.executable),
                        "-m",
                        "corral.cli",
                        "serve",
                        "--run",
                        display(workdir / "lora"),
                        "--port",
                        str(serve_port),
                    ],
                    300,
                    "serve: the LoRA run answers one chat request (openai client)",
                ),
            ],
        )
    )
    return steps


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def validate_plan(steps: list[Step]) -> list[str]:
    """Every training command's preset + overrides load as a TrainConfig; serve commands parse."""
    from corral.training.config import TrainConfig

    from corral.cli import build_parser
    from corral.config import load_config
    from corral.errors import CorralError

    problems = []
    for step in steps:
        for command in step.commands:
            argv = command.argv
            try:
                if "train.py" in argv:
                    at = argv.index("train.py")
                    if argv[at + 1] != "--config" or not (REPO / argv[at + 2]).is_file():
                        raise ValueError("train.py --config PRESET: preset missing")
                    load_config(TrainConfig, REPO / argv[at + 2], argv[at + 3 :])
                    config_at = argv.index("--config_file")
                    if not (REPO / argv[config_at + 1]).is_file():
                        raise ValueError(f"{argv[config_at + 1]}: no such accelerate config")
                elif "corral.cli" in argv:
                    build_parser().parse_args(argv[argv.index("corral.cli") + 1 :])
            except (CorralError, ValueError, SystemExit) as exc:
                problems.append(f"{step.name}: {command.what}: {exc}")
    return problems


def train_config_of(command: Command) -> Any:
    from corral.training.config import TrainConfig

    from corral.config import load_config

    at = command.argv.index("train.py")
    return load_config(TrainConfig, REPO / command.argv[at + 2], command.argv[at + 3 :])


def expectations_for(
    step: Step, arch: Architecture, gpus: int, spec: dict[str, Any] | None, gpu_name: str
) -> dict[str, Any]:
    """The arithmetic for this step's config, and tokens/s if its MFU matched the anchors."""
    if step.name == "serve":
        return serve_bound(arch, spec, gpu_name)
    if step.name not in ("lora", "qlora", "fsdp"):
        return {}
    config = train_config_of(step.commands[0])
    world = max(gpus, 2) if step.name == "fsdp" else 1
    memory = memory_arithmetic(
        arch,
        method=config.weights,
        micro_batch_size=config.micro_batch_size,
        max_length=config.max_length,
        gradient_checkpointing=config.gradient_checkpointing,
        lora_r=config.lora_r,
        lora_targets=config.lora_target_modules,
        world=world,
    )
    flops = flops_per_token(
        arch,
        method=config.weights,
        adapter_params=memory["lora_parameters"],
        context=config.max_length,
    )
    result: dict[str, Any] = {"memory_per_gpu": memory, "flops": flops}
    if is_llama_7b(arch):
        result["readme_7b_table"] = README_7B_TABLE[step.name]
    if spec is not None:
        at = {}
        for key, anchor in ANCHORS.items():
            at[key] = {
                "corral_formula": round(
                    tokens_per_s_at(
                        anchor["mfu"], flops["flops_per_token"], spec["bf16_tflops"], world
                    )
                ),
                "six_n_convention": round(
                    tokens_per_s_at(
                        anchor["mfu"], flops["six_n_flops_per_token"], spec["bf16_tflops"], world
                    )
                ),
            }
        result["tokens_per_s_if_mfu_equals_anchor"] = {
            "gpu": gpu_name,
            "bf16_tflops": spec["bf16_tflops"],
            "gpus": world,
            **at,
        }
        if arch.parameters < SMALL_MODEL_PARAMETERS:
            result["tokens_per_s_if_mfu_equals_anchor"]["note"] = (
                "the anchors are 7B LoRA figures; a model this small is bound by kernel launches "
                "and per-step overhead and stays far below them"
            )
    return result


def serve_bound(arch: Architecture, spec: dict[str, Any] | None, gpu_name: str) -> dict[str, Any]:
    """Decoding reads every bf16 weight once per step: memory bandwidth bounds steps/s."""
    weights_gb = arch.parameters * 2 / GB
    if spec is None:
        return {"weights_gb_bf16": round(weights_gb, 3)}
    return {
        "weights_gb_bf16": round(weights_gb, 3),
        "gpu": gpu_name,
        "memory_gb_per_s": spec["memory_gb_per_s"],
        "decode_steps_per_s_upper_bound": round(spec["memory_gb_per_s"] / weights_gb, 1),
        "note": "one stream gets at most one token per decode step; 8 streams share each step, "
        "so 8 streams can reach up to 8x; eager PyTorch decoding reaches a fraction of the bound, "
        "and a small model is bound by kernel launches long before bandwidth",
    }


def is_llama_7b(arch: Architecture) -> bool:
    return (arch.layers, arch.hidden, arch.vocab, arch.intermediate) == (32, 4096, 32000, 11008)


# ------------------------------------------------------------------------------ running


class MemorySampler(threading.Thread):
    """nvidia-smi memory.used of every GPU, sampled every 0.5 s; keeps the maximum."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.available = shutil.which("nvidia-smi") is not None
        self.before_gb = nvidia_smi_memory() if self.available else {}
        self.peak_gb: dict[int, float] = dict(self.before_gb)
        self._halt = threading.Event()

    def run(self) -> None:
        while self.available and not self._halt.is_set():
            for index, used in nvidia_smi_memory().items():
                self.peak_gb[index] = max(self.peak_gb.get(index, 0.0), used)
            self._halt.wait(0.5)

    def stop(self) -> dict[str, Any] | None:
        """Per GPU (nvidia-smi's numbering): memory used before the launch and at its peak."""
        self._halt.set()
        self.join(timeout=5)
        if not self.available or not self.peak_gb:
            return None
        return {
            "before_launch_gb": {str(i): round(v, 2) for i, v in sorted(self.before_gb.items())},
            "peak_gb": {str(i): round(v, 2) for i, v in sorted(self.peak_gb.items())},
            # The launch's own share on its busiest GPU, whatever the numbering.
            "max_increase_gb": round(
                max(v - self.before_gb.get(i, 0.0) for i, v in self.peak_gb.items()), 2
            ),
        }


def nvidia_smi_memory() -> dict[int, float]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    used = {}
    for line in out.strip().splitlines():
        index, mib = (part.strip() for part in line.split(",")[:2])
        if index.isdigit() and mib.replace(".", "").isdigit():
            used[int(index)] = float(mib) * 2**20 / GB
    return used


@dataclass
class Outcome:
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    timed_out: bool = False


class Runner:
    """Runs commands with a time limit each and a budget for the whole check."""

    def __init__(self, time_limit: float, log_dir: Path) -> None:
        self.deadline = time.monotonic() + time_limit
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, command: Command, name: str) -> Outcome:
        timeout = min(command.timeout, max(self.remaining(), 1.0))
        say(f"[{name}] {command.what}: {shlex.join(command.argv)} (limit {timeout:.0f} s)")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        out_path, err_path = self.log_dir / f"{name}.out", self.log_dir / f"{name}.err"
        started = time.monotonic()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            process = subprocess.Popen(
                command.argv, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True
            )
            timed_out = False
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                stop_process_group(process)
        return Outcome(
            returncode=process.returncode,
            seconds=round(time.monotonic() - started, 1),
            stdout=out_path.read_text(errors="replace"),
            stderr=err_path.read_text(errors="replace"),
            timed_out=timed_out,
        )


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the group this check started for the command (launcher and its workers), then KILL."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def say(text: str) -> None:
    print(f"gpu_check: {text}", file=sys.stderr, flush=True)


PROGRESS_LINE = re.compile(r"^\s*[\w ]*:?\s*\d+%\|")


def tail(text: str, chars: int = 3000) -> str:
    """The end of a stderr, without progress-bar lines."""
    lines = [
        line
        for line in re.split(r"[\r\n]+", text)
        if line.strip() and not PROGRESS_LINE.match(line)
    ]
    return "\n".join(lines)[-chars:]


def read_records(record_dir: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(record_dir.glob("rank*.json")):
        records.append(json.loads(path.read_text()))
    return sorted(records, key=lambda r: r["rank"])


def run_training(
    runner: Runner, command: Command, label: str
) -> tuple[Outcome, list[dict[str, Any]], dict[str, Any] | None]:
    assert command.record_dir is not None
    shutil.rmtree(command.record_dir, ignore_errors=True)  # our own records from an earlier check
    sampler = MemorySampler()
    sampler.start()
    try:
        outcome = runner.run(command, label)
    finally:
        smi = sampler.stop()
    return outcome, read_records(command.record_dir), smi


def measured_training(
    records: list[dict[str, Any]],
    arch: Architecture,
    method: str,
    devices: list[dict[str, Any]],
    expectation: dict[str, Any],
    smi: dict[str, Any] | None,
) -> dict[str, Any]:
    """Peak memory per process, tokens/s and MFU from the rank records of one launch."""
    world = len(records)
    per_rank = [
        {
            "rank": r["rank"],
            "load_peak_allocated_gb": round(r["memory"].get("load_peak_allocated_gb", 0), 3),
            "train_peak_allocated_gb": round(
                max((s["peak_allocated_gb"] or 0 for s in r["steps"]), default=0), 3
            ),
            "run_peak_after_setup_allocated_gb": round(
                r["memory"].get("after_setup_peak_allocated_gb", 0), 3
            ),
            "run_peak_after_setup_reserved_gb": round(
                r["memory"].get("after_setup_peak_reserved_gb", 0), 3
            ),
        }
        for r in records
    ]
    train_peak = max(p["train_peak_allocated_gb"] for p in per_rank)
    arithmetic = expectation["memory_per_gpu"]
    memory = {
        "method": "torch.cuda.max_memory_allocated per process, reset after setup; nvidia-smi "
        "memory.used sampled every 0.5 s (adds CUDA context, allocator cache, other processes)",
        "per_process": per_rank,
        "nvidia_smi": smi,
        "arithmetic_tensors_gb": arithmetic["tensors_gb"],
        "arithmetic_total_gb": arithmetic["total_gb"],
        "train_peak_allocated_over_arithmetic_tensors": round(
            train_peak / arithmetic["tensors_gb"], 3
        ),
    }
    if smi:
        memory["nvidia_smi_increase_over_arithmetic_total"] = round(
            smi["max_increase_gb"] / arithmetic["total_gb"], 3
        )
    if "readme_7b_table" in expectation:
        memory["readme_7b_table"] = expectation["readme_7b_table"]

    lead = records[0]["steps"]
    counted = lead[WARMUP_STEPS:] if len(lead) > WARMUP_STEPS else lead
    tokens = seconds = attention_sq = 0.0
    for entry in counted:
        same = [
            s for r in records for s in r["steps"] if s["step"] == entry["step"]
        ]  # this step on every rank
        tokens += entry["tokens"]
        seconds += max(s["seconds"] for s in same)
        attention_sq += sum(s["local_sum_sq_lengths"] for s in same)
    throughput: dict[str, Any] = {
        "method": f"non-padding tokens / CUDA-synchronised step time; first {WARMUP_STEPS} "
        "steps of the launch left out",
        "steps_counted": len(counted),
        "tokens": int(tokens),
        "seconds": round(seconds, 3),
    }
    if not seconds or not tokens:
        return {"memory": memory, "throughput": throughput}
    rate = tokens / seconds
    throughput["tokens_per_s"] = round(rate, 1)
    throughput["tokens_per_s_per_gpu"] = round(rate / world, 1)
    context = attention_sq / tokens
    adapter = records[0]["setup"]["trainable_parameters"] if method != "full" else 0
    flops = flops_per_token(arch, method=method, adapter_params=adapter, context=context)
    achieved = flops["flops_per_token"] * rate / 1e12
    mfu: dict[str, Any] = {
        **flops,
        "achieved_tflops_total": round(achieved, 2),
        "gpus": world,
        "anchors": {key: anchor["mfu"] for key, anchor in ANCHORS.items()},
    }
    used = devices[:world]
    table = [gpu_specs(d["name"]) for d in used]
    if used and all(table):
        peak = sum(t["bf16_tflops"] for t in table)
        mfu["peak_tflops_table"] = peak
        mfu["mfu_vs_table"] = round(achieved / peak, 4)
        mfu["six_n_mfu_vs_table"] = round(flops["six_n_flops_per_token"] * rate / 1e12 / peak, 4)
    measured = [d.get("measured_bf16_tflops") for d in used]
    if used and all(measured):
        peak = sum(measured)
        mfu["peak_tflops_measured_matmul"] = round(peak, 1)
        mfu["mfu_vs_measured_matmul"] = round(achieved / peak, 4)
    return {"memory": memory, "throughput": throughput, "mfu": mfu}


def checks_after_training(
    name: str,
    outcome: Outcome,
    records: list[dict[str, Any]],
    expected_steps: int,
    gpus: int,
    bf16: bool = True,
) -> list[str]:
    problems = []
    if outcome.timed_out:
        problems.append(f"timed out after {outcome.seconds:.0f} s")
    elif outcome.returncode != 0:
        problems.append(f"exit status {outcome.returncode}")
    if len(records) != gpus:
        problems.append(f"{len(records)} rank records for {gpus} processes")
    if not records or records[0]["setup"] is None:
        return problems + ["setup did not finish"]
    setup = records[0]["setup"]
    steps = records[0]["steps"]
    if len(steps) != expected_steps:
        problems.append(f"{len(steps)} optimizer steps recorded, expected {expected_steps}")
    if any(not math.isfinite(s["loss"]) for s in steps):
        problems.append("a non-finite loss")
    if not setup["device"].startswith("cuda"):
        problems.append(f"trained on {setup['device']}, not a GPU")
    if name == "lora":
        if setup["mixed_precision"] != "bf16":
            problems.append(f"mixed precision {setup['mixed_precision']}, expected bf16")
        if set(setup["frozen_dtypes"]) != {"torch.bfloat16"}:
            problems.append(f"frozen weights in {setup['frozen_dtypes']}, expected bf16")
    if name == "qlora":
        q = setup["quantization"] or {}
        if q.get("bnb_4bit_quant_type") != "nf4" or not q.get("bnb_4bit_use_double_quant"):
            problems.append(f"quantization {q}, expected NF4 with double quantization")
        if not setup["linear4bit_modules"]:
            problems.append("no Linear4bit modules")
        if bf16 and q.get("bnb_4bit_compute_dtype") != "bfloat16":
            problems.append(f"4-bit compute dtype {q.get('bnb_4bit_compute_dtype')}, expected bf16")
        if "Paged" not in setup["optimizer"]:
            problems.append(f"optimizer {setup['optimizer']}, expected bitsandbytes' paged AdamW")
        if not setup["gradient_checkpointing"]:
            problems.append("gradient checkpointing is off")
    if name == "fsdp":
        if "FSDP" not in setup["distributed_type"] or setup["fsdp_version"] != 2:
            problems.append(
                f"{setup['distributed_type']} version {setup['fsdp_version']}, expected FSDP2"
            )
        if not setup["dtensor_parameters"]:
            problems.append("parameters are not DTensor shards (FSDP2)")
    return problems


def sharded_files(checkpoint: Path) -> dict[str, int]:
    return {
        sub: len(list((checkpoint / sub).glob("*.distcp")))
        for sub in ("pytorch_model_fsdp_0", "optimizer_0")
    }


def run_fsdp(
    runner: Runner, step: Step, arch: Architecture, devices: list, gpus: int, expectation: dict
) -> dict[str, Any]:
    from corral.rundir import RunDir

    first, resumed = step.commands
    result: dict[str, Any] = {"problems": []}
    outcome, records, smi = run_training(runner, first, "fsdp")
    result["first_launch"] = {"exit_status": outcome.returncode, "seconds": outcome.seconds}
    problems = checks_after_training("fsdp", outcome, records, FSDP_STEPS, gpus)
    if problems:
        result["problems"] += problems
        result["stderr_tail"] = tail(outcome.stderr)
        return result
    result.update(measured_training(records, arch, "full", devices, expectation, smi))
    config = train_config_of(first)
    run_dir = REPO / config.output_dir
    at = RunDir(run_dir).checkpoint(FSDP_CHECKPOINT_AT)
    files = sharded_files(at)
    result["sharded_checkpoint"] = {"checkpoint": display(at), "distcp_files": files}
    if any(count < gpus for count in files.values()):
        result["problems"].append(f"{display(at)}: expected >= {gpus} .distcp files per part")
    losses = {s["step"]: s["loss"] for s in records[0]["steps"]}

    # A crash after checkpoint-3 was written: the newest checkpoint disappears.
    shutil.rmtree(RunDir(run_dir).checkpoint(FSDP_STEPS), ignore_errors=True)
    outcome, again, _ = run_training(runner, resumed, "fsdp_resume")
    result["resumed_launch"] = {"exit_status": outcome.returncode, "seconds": outcome.seconds}
    expected = FSDP_STEPS - FSDP_CHECKPOINT_AT
    problems = checks_after_training("fsdp", outcome, again, expected, gpus)
    if problems:
        result["problems"] += [f"resume: {p}" for p in problems]
        result["stderr_tail"] = tail(outcome.stderr)
        return result
    setup = again[0]["setup"]
    if setup["start_step"] != FSDP_CHECKPOINT_AT or not str(setup["resumed_from"]).endswith(
        f"checkpoint-{FSDP_CHECKPOINT_AT}"
    ):
        result["problems"].append(
            f"resume started at step {setup['start_step']} from {setup['resumed_from']}"
        )
    compared = [
        {"step": s["step"], "uninterrupted": losses.get(s["step"]), "resumed": s["loss"]}
        for s in again[0]["steps"]
    ]
    worst = max(
        (
            abs(c["resumed"] - c["uninterrupted"])
            for c in compared
            if c["uninterrupted"] is not None
        ),
        default=math.inf,
    )
    result["resume"] = {
        "resumed_from": setup["resumed_from"],
        "losses": compared,
        "max_abs_loss_difference": worst,
        "tolerance": RESUME_LOSS_TOLERANCE,
    }
    if not worst <= RESUME_LOSS_TOLERANCE:
        result["problems"].append(
            f"resumed losses differ from the uninterrupted run by {worst:.4g} "
            f"(tolerance {RESUME_LOSS_TOLERANCE})"
        )
    if not (run_dir / "model.safetensors").is_file() and not list(
        run_dir.glob("model-*.safetensors")
    ):
        result["problems"].append(f"{display(run_dir)}: no final weights saved")
    return result


def wait_healthy(port: int, process: subprocess.Popen, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def serve_run_once(runner: Runner, command: Command) -> dict[str, Any]:
    """Start `corral serve --run`, ask one chat question through the openai client, stop it."""
    import openai

    port = int(command.argv[command.argv.index("--port") + 1])
    log = runner.log_dir / "serve_run.err"
    say(f"[serve] {command.what}: {shlex.join(command.argv)}")
    with open(log, "w") as err:
        process = subprocess.Popen(
            command.argv,
            cwd=REPO,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "CORRAL_API_KEY": ""},
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        if not wait_healthy(port, process, min(command.timeout, runner.remaining())):
            return {
                "problems": ["the server did not become healthy"],
                "stderr_tail": tail(log.read_text()),
            }
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120
        )
        model_id = client.models.list().data[0].id
        began = time.perf_counter()
        reply = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Name three rivers."}],
            max_tokens=32,
            temperature=0,
        )
        # A short-trained adapter may answer badly; what is checked is a well-formed reply.
        generated = reply.usage.completion_tokens if reply.usage else 0
        return {
            "model_id": model_id,
            "answer": (reply.choices[0].message.content or "")[:200] if reply.choices else None,
            "completion_tokens": generated,
            "seconds": round(time.perf_counter() - began, 3),
            "problems": [] if reply.choices and generated else ["no tokens generated"],
        }
    except Exception as exc:  # noqa: BLE001 - any failure of the request is the finding
        return {"problems": [f"{type(exc).__name__}: {exc}"], "stderr_tail": tail(log.read_text())}
    finally:
        stop_process_group(process)


# ------------------------------------------------------------------------------ data


WORDS = (
    "river mountain village keeper lighthouse morning evening forest garden window road winter "
    "summer harbor market bridge letter journey stone field storm bread music teacher child "
    "friend boat candle lantern valley cloud orchard kitchen station map clock path hill ocean "
    "quietly slowly carefully suddenly again always often never together later early gently "
    "walked carried found opened watched remembered painted followed answered gathered built "
    "old small bright warm cold distant green silver heavy quiet golden narrow wide gentle"
).split()


def write_data(path: Path, records: int = 256, words: int = 700) -> None:
    """Alpaca records whose answers are longer than any max_length used (cut by truncation)."""
    rng = random.Random(0)
    data = []
    for index in range(records):
        sentences, count = [], 0
        while count < words:
            n = rng.randint(6, 14)
            sentence = " ".join(rng.choice(WORDS) for _ in range(n))
            sentences.append(sentence[0].upper() + sentence[1:] + ".")
            count += n
        data.append(
            {
                "instruction": f"Continue story number {index} about the {rng.choice(WORDS)}.",
                "input": "",
                "output": " ".join(sentences),
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


# ------------------------------------------------------------------------------ main


def read_architecture(model: str) -> tuple[Architecture, str]:
    """(architecture, where its config came from); ModelNotFoundError/ValueError when unusable."""
    from corral.errors import ModelNotFoundError
    from corral.models import resolve_model

    if model in KNOWN_CONFIGS and not Path(model).exists():
        config, source = KNOWN_CONFIGS[model], "built-in copy of the published config.json"
    else:
        resolved = resolve_model(model)
        folder = Path(resolved)
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise ModelNotFoundError(f"{model}: not a base model folder (no config.json)")
            config, source = json.loads((folder / "config.json").read_text()), display(folder)
        else:
            try:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(resolved).to_dict()
            except Exception as exc:  # noqa: BLE001 - offline, gated, misspelt: one message
                raise ModelNotFoundError(
                    f"{model}: cannot read its config.json ({type(exc).__name__}); give a local "
                    "model folder"
                ) from None
            source = f"hub: {resolved}"
    if config.get("model_type") != "llama":
        raise ValueError(
            f"{model}: model_type {config.get('model_type')!r}; the check needs a LLaMA-"
            "architecture model (configs/accelerate/fsdp.yaml wraps LlamaDecoderLayer)"
        )
    return Architecture.from_config(config), source


class ProbeFailed(Exception):
    """A machine with an NVIDIA driver whose probe crashed: a finding, not "no GPU"."""


def detect_gpus() -> tuple[dict[str, Any] | None, str]:
    """(probe result, why there is no GPU: "" when there is one).

    The probe (which imports torch and times matmuls) runs only where a GPU may exist.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or (
        shutil.which("nvidia-smi") is None and not Path("/dev/nvidiactl").exists()
    ):
        return None, "no NVIDIA driver (no nvidia-smi, no /dev/nvidiactl)"
    out = None
    try:
        out = subprocess.run(
            [sys.executable, str(Path(__file__)), "--probe"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
        )
        info = json.loads(out.stdout)
    except subprocess.TimeoutExpired:
        raise ProbeFailed("the probe did not finish in 180 s") from None
    except (json.JSONDecodeError, OSError) as exc:
        raise ProbeFailed(
            f"the probe failed (exit status {getattr(out, 'returncode', None)}, "
            f"{type(exc).__name__}): {tail(getattr(out, 'stderr', ''), 2000)}"
        ) from None
    if not info["cuda_available"] or not info["devices"]:
        return info, f"torch {info['torch']} sees no CUDA device"
    return info, ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description="Check Corral on this GPU machine (LoRA, QLoRA, FSDP2, serving) and report "
        "JSON; without a GPU, print the plan and exit 0.",
    )
    parser.add_argument(
        "--model", default="embedded", help="LLaMA-architecture model (default embedded)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--gpus", type=int, help="processes for the FSDP step (default: all GPUs)")
    parser.add_argument(
        "--skip", action="append", default=[], choices=("lora", "qlora", "fsdp", "serve")
    )
    parser.add_argument("--workdir", default="runs/gpu_check", help="data, runs, logs")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole check")
    parser.add_argument("--output", help="also write the JSON to this file")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--probe"]:
        print(json.dumps(probe()))
        return 0
    if argv[:1] == ["--train-worker"]:
        train_worker(Path(argv[1]), argv[2:])
        return 0
    args = parse_args(argv)
    from corral.errors import CorralError

    try:
        arch, source = read_architecture(args.model)
    except (CorralError, ValueError) as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    # A local folder is passed on as an absolute path: every command runs from the repository.
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    if args.time_limit is None:
        args.time_limit = 600.0 if arch.parameters < SMALL_MODEL_PARAMETERS else 2400.0
    workdir = Path(args.workdir).resolve()

    if args.dry_run:
        info, detail, reason = None, "--dry-run given", "--dry-run"
    else:
        try:
            info, detail = detect_gpus()
        except ProbeFailed as exc:
            emit({"check": "gpu_check", "gpu": None, "ok": False, "probe_error": str(exc)}, None)
            return 1
        reason = "no CUDA device" if detail else ""
    devices = (info or {}).get("devices", []) if not reason else []
    gpus = args.gpus or len(devices) or 8  # the plan without GPUs shows the README's 8
    steps = build_plan(args, model, workdir, gpus)
    problems = validate_plan(steps)
    reference = devices[0]["name"] if devices else REFERENCE_GPU
    spec = gpu_specs(reference)
    for step in steps:
        step.expectations = expectations_for(step, arch, gpus, spec, reference)
    report: dict[str, Any] = {
        "check": "gpu_check",
        "model": {
            "name": args.model,
            "config_from": source,
            "parameters": arch.parameters,
            "layers": arch.layers,
            "hidden": arch.hidden,
            "intermediate": arch.intermediate,
            "vocab": arch.vocab,
            "heads": arch.heads,
            "kv_heads": arch.kv_heads,
            "tied_embeddings": arch.tied,
            "is_llama_7b": is_llama_7b(arch),
        },
        "gpu": None,
        "time_limit_s": args.time_limit,
        "formulas": {
            "memory": "tensors: weights + grads + optimizer (sharded / world under FSDP) + "
            f"activations ({ACTIVATION_BYTES_PER_TOKEN_HIDDEN} B x tokens x hidden x layers; with "
            "checkpointing 2 B x tokens x hidden x layers + one layer recomputed) + logits "
            f"(tokens x vocab x {LOGIT_BYTES} B); total adds {OVERHEAD_GB} GB of CUDA context and "
            "allocator slack. Decimal GB.",
            "flops_full": "6*N_mm + 12*L*d*l per token",
            "flops_lora": "4*N_mm + 6*N_adapter + 12*L*d*l per token (frozen weights: no weight "
            "gradients)",
            "six_n_convention": "6*N per token, N = all parameters (for comparison)",
            "mfu": "flops_per_token x tokens/s / (peak bf16 FLOPs x GPUs)",
        },
        "anchors": ANCHORS,
        "plan_problems": problems,
    }
    if reason:
        report.update(
            {
                "reason": reason,
                "detail": detail,
                "dry_run": True,
                "host": host_facts(info),
                "expectations_for_gpu": reference,
                "plan": [plan_entry(step, gpus) for step in steps],
                "ok": not problems,
            }
        )
        emit(report, args.output)
        return 0 if not problems else 1

    if gpus > len(devices):
        print(f"gpu_check: error: --gpus {gpus}: only {len(devices)} GPU(s) here", file=sys.stderr)
        return 2
    report["gpu"] = {
        "count": len(devices),
        "devices": devices,
        **{k: info[k] for k in info if k != "devices"},
    }
    report["dry_run"] = False
    bf16 = all(d["bf16"] for d in devices)
    write_data(workdir / "data" / "gpu_check_alpaca.json")
    runner = Runner(args.time_limit, workdir / "logs")
    results: dict[str, Any] = {}
    for step in steps[1:]:
        skip = None
        if step.name in args.skip:
            skip = "--skip"
        elif step.name == "fsdp" and gpus < 2:
            skip = f"needs 2+ GPUs ({gpus} used)"
        elif step.name in ("lora", "qlora", "fsdp") and not bf16:
            skip = "this GPU has no bf16 (compute capability < 8.0); Corral trains in bf16 or fp32"
        elif step.name == "serve" and "lora" in results and results["lora"]["status"] != "ok":
            step.commands = step.commands[:1]  # nothing trained to serve
        if skip is None and runner.remaining() < 30:
            skip = "time limit reached"
        if skip:
            results[step.name] = {"status": "skipped", "reason": skip}
            continue
        results[step.name] = run_step(runner, step, arch, devices, gpus)
    report["plan"] = [plan_entry(step, gpus) for step in steps]
    report["results"] = results
    failed = [name for name, r in results.items() if r["status"] == "failed"]
    report["failed_steps"] = failed
    report["summary"] = summarize(results)
    report["ok"] = not failed and not problems
    emit(report, args.output)
    return 0 if report["ok"] else 1


def host_facts(probe_result: dict[str, Any] | None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = None
    return {"python": sys.version.split()[0], "torch": torch_version, "probe": probe_result}


def run_step(runner: Runner, step: Step, arch: Architecture, devices: list, gpus: int) -> dict:
    began = time.monotonic()
    if step.name in ("lora", "qlora"):
        command = step.commands[0]
        outcome, records, smi = run_training(runner, command, step.name)
        config = train_config_of(command)
        problems = checks_after_training(step.name, outcome, records, config.max_steps, 1)
        result: dict[str, Any] = {"exit_status": outcome.returncode}
        if records and records[0]["setup"]:
            result["setup"] = records[0]["setup"]
        if records and records[0]["steps"]:
            result.update(
                measured_training(records, arch, config.weights, devices, step.expectations, smi)
            )
        result["problems"] = problems
        if problems:
            result["stderr_tail"] = tail(outcome.stderr)
    elif step.name == "fsdp":
        result = run_fsdp(runner, step, arch, devices, max(gpus, 2), step.expectations)
    else:  # serve
        outcome = runner.run(step.commands[0], "serve")
        result = {"exit_status": outcome.returncode, "problems": []}
        try:
            result["throughput"] = json.loads(outcome.stdout)
        except json.JSONDecodeError:
            result["problems"].append(f"serve_throughput.py: exit status {outcome.returncode}")
            result["stderr_tail"] = tail(outcome.stderr)
        if len(step.commands) > 1:
            result["run_served"] = serve_run_once(runner, step.commands[1])
            result["problems"] += [f"serve --run: {p}" for p in result["run_served"]["problems"]]
        else:
            result["run_served"] = {"skipped": "the lora step made no run to serve"}
    result["status"] = "failed" if result["problems"] else "ok"
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """One line of figures per step, for reading the report at a glance."""
    summary = {}
    for name, result in results.items():
        line: dict[str, Any] = {"status": result["status"]}
        memory, throughput, mfu = (result.get(k, {}) for k in ("memory", "throughput", "mfu"))
        if memory:
            line["train_peak_allocated_gb"] = max(
                p["train_peak_allocated_gb"] for p in memory["per_process"]
            )
            line["arithmetic_tensors_gb"] = memory["arithmetic_tensors_gb"]
            line["nvidia_smi_max_increase_gb"] = (memory["nvidia_smi"] or {}).get("max_increase_gb")
            line["arithmetic_total_gb"] = memory["arithmetic_total_gb"]
        for key in ("tokens_per_s", "tokens_per_s_per_gpu"):
            if key in throughput:
                line[key] = throughput[key]
        for key in ("mfu_vs_table", "mfu_vs_measured_matmul", "six_n_mfu_vs_table"):
            if key in mfu:
                line[key] = mfu[key]
        if name == "serve" and isinstance(result.get("throughput"), dict):
            served = result["throughput"]
            line["tokens_per_s_1_stream"] = served.get("one_stream", {}).get("tokens_per_second")
            line["tokens_per_s_8_streams"] = served.get("8_streams", {}).get("tokens_per_second")
        if result.get("problems"):
            line["problems"] = result["problems"]
        if result.get("reason"):
            line["reason"] = result["reason"]
        summary[name] = line
    return summary


def plan_entry(step: Step, gpus: int) -> dict[str, Any]:
    entry = {
        "step": step.name,
        "what": step.what,
        "runs_when": step.runs_when,
        "commands": [c.as_json() for c in step.commands],
    }
    launches = [c.argv for c in step.commands if "--train-worker" in c.argv]
    if launches:
        entry["as_a_user_types_it"] = [shlex.join(user_command(argv)) for argv in launches]
    if step.between:
        entry["between_commands"] = step.between
    if step.expectations:
        entry["expectations"] = step.expectations
    return entry


def user_command(argv: list[str]) -> list[str]:
    """The launch without the recording worker: what a user runs to do the same by hand."""
    at = argv.index("--train-worker")
    return ["accelerate", *argv[1 : at - 1], *argv[at + 2 :]]


def emit(report: dict[str, Any], output: str | None) -> None:
    text = json.dumps(report, indent=2)
    if output:
        Path(output).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

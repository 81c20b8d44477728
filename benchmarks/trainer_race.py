"""What the two training benchmarks (train_throughput, dpo_throughput) share: the setting both
trainers get, Corral's run of it, the embedded model and arguments TRL's trainers start from, and
the race itself: each trainer in its own process (peak RSS is its own), both at once, each pinned
to its own core with one thread, so both see the same machine, other work on it included."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from corral.config import load_config
from corral.rundir import read_summary

MAX_LENGTH = 256
LEARNING_RATE = 2e-4
SEED = 42
LORA_RANK, LORA_ALPHA, LORA_TARGETS = 8, 16, ["q_proj", "v_proj"]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def run_corral(
    run_dir: Path, data: Path, *, steps: int, batch: int, lora_dropout: float, settings: list[str]
) -> dict[str, Any]:
    """Corral's loop on the shared setting plus `settings` (key=value); its timing and memory."""
    from corral.training.config import TrainConfig
    from corral.training.loop import train

    overrides = [
        "model=embedded", f"data={data}", "template=alpaca", f"max_length={MAX_LENGTH}",
        f"lora_r={LORA_RANK}", f"lora_alpha={LORA_ALPHA}", f"lora_dropout={lora_dropout}",
        f"lora_target_modules=[{','.join(LORA_TARGETS)}]", f"micro_batch_size={batch}",
        "gradient_accumulation_steps=1", "group_by_length=true", "packing=false",
        f"max_steps={steps}", f"learning_rate={LEARNING_RATE}", "lr_scheduler=constant",
        "warmup_steps=0", "max_grad_norm=1.0", f"seed={SEED}", "val_size=0", "save_steps=0",
        "report_to=[none]", f"output_dir={run_dir}", *settings,
    ]  # fmt: skip
    train(load_config(TrainConfig, None, overrides))
    peak = peak_rss_gb()
    summary = read_summary(run_dir)
    return {
        "tokens_per_s": summary["session_tokens_per_s"],
        "tokens": summary["session_tokens"],
        "train_seconds": summary["session_train_seconds"],
        "peak_rss_gb": peak,
        "adapter": str(run_dir),
    }


def embedded_for_trl() -> tuple[Any, Any, Any]:
    """The embedded model in fp32, its tokenizer and the Alpaca template, as Corral loads them."""
    import torch

    from corral.models import load_model, load_tokenizer, quiet_transformers
    from corral.templates import get_template

    with quiet_transformers():
        tokenizer = load_tokenizer("embedded")
        model = load_model("embedded", dtype=torch.float32, tokenizer=tokenizer)
    return model, tokenizer, get_template("alpaca", tokenizer)


def trl_arguments(out_dir: Path, *, steps: int, batch: int) -> dict[str, Any]:
    """The arguments TRL's SFTConfig and DPOConfig both take, matching `run_corral`'s setting."""
    return {
        "output_dir": str(out_dir), "max_length": MAX_LENGTH,
        "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
        "max_steps": steps, "learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant",
        "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0, "optim": "adamw_torch",
        "use_cpu": True, "bf16": False, "fp16": False, "seed": SEED, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }  # fmt: skip


def trl_lora(dropout: float) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=dropout,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )


def add_racer_arguments(parser: argparse.ArgumentParser, roles: tuple[str, ...]) -> None:
    """The hidden arguments a racing child process is started with."""
    parser.add_argument("--role", choices=roles, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)


def enter_race(core: int | None) -> None:
    """In a child: run on `core` alone, with one torch thread."""
    import torch

    if core is not None:
        os.sched_setaffinity(0, {core})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)


def race(module: str, roles: list[str], workdir: Path, arguments: list[str]) -> dict[str, dict]:
    """Run `python -m MODULE --role R --workdir W --core C ARGUMENTS` for each role at once; each
    child prints its result as the last line of JSON."""
    cores = sorted(os.sched_getaffinity(0))
    processes = {}
    started = time.monotonic()
    for position, role in enumerate(roles):
        processes[role] = subprocess.Popen(
            [sys.executable, "-m", module, "--role", role, "--workdir", str(workdir),
             "--core", str(cores[position % len(cores)]), *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    results = {}
    for role, process in processes.items():
        out, err = process.communicate()
        if process.returncode != 0:
            sys.exit(f"{role} failed:\n{err[-4000:]}")
        results[role] = json.loads(out.strip().splitlines()[-1])
        print(
            f"{role}: {json.dumps(results[role])} ({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
        )
    return results

"""GRPO throughput and memory: Corral's `method=grpo` against TRL's GRPOTrainer, in the same run.

    .venv/bin/python benchmarks/grpo_throughput.py [--steps 4]

Both trainers run GRPO on the embedded model (SmolLM2-135M-Instruct) with a fresh LoRA adapter
(r 8 / alpha 16 / dropout 0 on q_proj and v_proj), fp32 on the CPU, on the built-in arithmetic task
(configs/training/grpo_arithmetic.jsonl) rendered by the model's chat template: 4 prompts x 4
completions per optimizer step (8 completions per forward pass, 2 accumulated), at most 16
completion tokens, temperature 0.5, beta 0 (no reference), the dapo loss, the final_number reward,
the same learning rate, constant schedule and step count. Each trainer runs in its own process
(peak RSS is its own), both at once, each pinned to its own core with one thread.

What is measured:
- steps_per_hour: optimizer steps (rollout, scoring and update alike) per hour of training,
  excluding model loading (Corral: the run's own clock at its last step; TRL: train_runtime);
- rollout_share: the share of step time spent generating (Corral: time/rollout; TRL: its
  profiling of generation, when it logs one, else null);
- peak_rss_gb: the process's peak resident memory up to the end of training.

The last line printed is one JSON object with steps_per_hour_ratio and peak_rss_ratio (Corral over
TRL). A benchmark, not a test: bound it with --steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "configs" / "training" / "grpo_arithmetic.jsonl"
PRESET = REPO / "configs" / "training" / "grpo_smoke.yaml"
GENERATIONS, COMPLETIONS_PER_FORWARD, ACCUMULATION = 4, 8, 2
MAX_COMPLETION, TEMPERATURE, LEARNING_RATE = 16, 0.5, 1e-3


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def run_corral(workdir: Path, steps: int) -> dict:
    from corral.training.config import TrainConfig
    from corral.training.loop import train

    from corral.config import load_config

    run_dir = workdir / "corral"
    config = load_config(
        TrainConfig,
        PRESET,
        [
            f"output_dir={run_dir}",
            f"max_steps={steps}",
            "val_size=0",
            "eval_steps=0",
            "save_steps=0",
            "report_to=[none]",
        ],
    )
    train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [row for row in rows if "loss" in row]
    seconds = steps_rows[-1]["time"]
    rollout = sum(row.get("time/rollout", 0.0) for row in steps_rows)
    return {
        "steps_per_hour": round(3600 * len(steps_rows) / seconds, 2),
        "rollout_share": round(rollout / seconds, 3),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "train_seconds": round(seconds, 1),
    }


def run_trl(workdir: Path, steps: int) -> dict:
    import torch
    from corral.training.rewards import final_number
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from corral.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("embedded")
    model = load_model("embedded", dtype=torch.float32, tokenizer=tokenizer)
    records = [json.loads(line) for line in TASK.read_text().splitlines()]
    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
            for r in records
        ]
    )

    def final_number_reward(prompts, completions, answer, **fields):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return final_number(prompts, texts, answer)

    args = GRPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=COMPLETIONS_PER_FORWARD,
        gradient_accumulation_steps=ACCUMULATION,
        num_generations=GENERATIONS,
        max_completion_length=MAX_COMPLETION,
        temperature=TEMPERATURE,
        beta=0.0,
        loss_type="dapo",
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=42,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[final_number_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
        ),
    )
    output = trainer.train()
    seconds = output.metrics["train_runtime"]
    return {
        "steps_per_hour": round(3600 * steps / seconds, 2),
        "rollout_share": None,
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "train_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps for each trainer")
    parser.add_argument("--role", choices=("corral", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        import torch

        if args.core is not None:
            os.sched_setaffinity(0, {args.core})
        torch.set_num_threads(1)
        run = run_corral if args.role == "corral" else run_trl
        print(json.dumps(run(args.workdir, args.steps)))
        return

    with tempfile.TemporaryDirectory(prefix="corral-grpo-bench-") as tmp:
        cores = sorted(os.sched_getaffinity(0))
        procs, results, started = {}, {}, time.monotonic()
        for position, role in enumerate(("corral", "trl")):
            command = [sys.executable, __file__, "--role", role, "--workdir", tmp]
            command += ["--steps", str(args.steps), "--core", str(cores[position % len(cores)])]
            procs[role] = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
            )
        for role, proc in procs.items():
            out, err = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"{role} failed:\n{err[-4000:]}")
            results[role] = json.loads(out.strip().splitlines()[-1])
            elapsed = time.monotonic() - started
            print(f"{role}: {json.dumps(results[role])} ({elapsed:.0f} s)", file=sys.stderr)
    corral, trl = results["corral"], results["trl"]
    report = {
        "steps": args.steps,
        "completions_per_step": COMPLETIONS_PER_FORWARD * ACCUMULATION,
        "num_generations": GENERATIONS,
        "max_completion_length": MAX_COMPLETION,
        "corral": corral,
        "trl": trl,
        "steps_per_hour_ratio": round(corral["steps_per_hour"] / trl["steps_per_hour"], 3),
        "peak_rss_ratio": round(corral["peak_rss_gb"] / trl["peak_rss_gb"], 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()

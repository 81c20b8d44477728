"""DPO throughput and memory: Corral's `method=dpo` against TRL's DPOTrainer, in the same run.

    .venv/bin/python benchmarks/dpo_throughput.py [--steps 16]

Both trainers run DPO on the embedded model (SmolLM2-135M-Instruct) with a fresh LoRA adapter
(r 8 / alpha 16 / dropout 0 on q_proj and v_proj; the reference policy is the base with the adapter
disabled, no second copy in memory), the sigmoid loss with beta 0.1, fp32 on the CPU, 4 pairs per
optimizer step, maximum length 256, the same learning rate, constant schedule, gradient clipping
and step count, on the same Alpaca-template pairs. Each trainer runs in its own process (peak RSS
is its own), both at once, each pinned to its own core with one thread.

The pairs are Corral's own: each of Corral's 45 default seed tasks gives one (its answer chosen;
rejected: another task's answer, or, for every other task whose answer has 3 words or more, its
own answer cut to its first third), plus the 40 hand-written pairs of
configs/training/smoke_preferences.jsonl. `steps * 4` of them train (one epoch for each trainer,
in each trainer's own order), 16 are held out.

What is measured:
- tokens_per_s: non-padding tokens of the chosen and rejected sequences (prompt and answer alike)
  per second of training steps (reference and policy forward, backward, optimizer), excluding
  model loading and evaluation (Corral: its step timer; TRL: its `num_tokens` over train_runtime);
- peak_rss_gb: the process's peak resident memory up to the end of training;
- final_train_loss / final_train_reward_accuracy: each trainer's own logged values, mean of the
  last 4 steps;
- eval_loss / eval_reward_accuracy (held-out pairs) and train_reward_accuracy (the training pairs),
  for both trained adapters by the same function (Corral's DPO loss, reference = base), so they
  are comparable.

Corral runs its defaults for speed, as in benchmarks/train_throughput.py: length-grouped batches,
logits only at answer tokens, and `max_tokens_per_forward=512` (a step's 4 pairs run as forward
passes of at most 512 padded tokens; the same gradient, a fraction of the activation memory). TRL
runs its DPOTrainer defaults (padding to the longest sequence of the batch; dropout disabled,
which changes nothing here as LoRA dropout is 0). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEEDS = REPO / "data_gen" / "seeds" / "default_seed_tasks.jsonl"
SMOKE_PAIRS = REPO / "configs" / "training" / "smoke_preferences.jsonl"
MAX_LENGTH = 256
BATCH = 4  # pairs per optimizer step
HELD_OUT = 16
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
BETA = 0.1
LEARNING_RATE = 2e-4
SEED = 42


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def build_pairs(workdir: Path, steps: int) -> None:
    """train.jsonl (steps * BATCH pairs) and heldout.jsonl (HELD_OUT pairs) in `workdir`."""
    from corral.training.preference import read_preferences

    from corral.records import read_seed_tasks

    seeds = read_seed_tasks(SEEDS)
    pairs = []
    for position, seed in enumerate(seeds):
        instance = seed.instances[0]
        answer = instance["output"]
        words = answer.split()
        if position % 2 == 1 and len(words) >= 3:  # cut short: the first third of its words
            rejected = " ".join(words[: len(words) // 3])
        else:  # off-topic: another task's answer
            rejected = seeds[(position + 7) % len(seeds)].instances[0]["output"]
        if rejected != answer:
            pairs.append(
                {
                    "prompt": seed.instruction,
                    "input": instance["input"],
                    "chosen": answer,
                    "rejected": rejected,
                }
            )
    pairs.extend(read_preferences(SMOKE_PAIRS))
    random.Random(SEED).shuffle(pairs)
    needed = steps * BATCH + HELD_OUT
    if len(pairs) < needed:
        sys.exit(f"{len(pairs)} pairs are fewer than {needed}: lower --steps")
    for name, chunk in (("heldout", pairs[:HELD_OUT]), ("train", pairs[HELD_OUT:needed])):
        with open(workdir / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for pair in chunk:
                handle.write(json.dumps(pair) + "\n")


def evaluate_adapter(adapter_dir: Path, pairs_path: Path) -> dict:
    """DPO loss and reward accuracy of an adapter on pairs (reference: the base), mean per pair."""
    import torch
    from corral.training.preference import (
        collate_pairs,
        dpo_loss_sum,
        read_preferences,
        tokenize_pairs,
    )
    from peft import PeftModel

    from corral.models import load_model, load_tokenizer, quiet_transformers
    from corral.templates import get_template

    with quiet_transformers():
        tokenizer = load_tokenizer("embedded")
        base = load_model("embedded", dtype=torch.float32, tokenizer=tokenizer)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    template = get_template("alpaca", tokenizer)
    pairs, _ = tokenize_pairs(
        read_preferences(pairs_path), tokenizer, template, max_length=MAX_LENGTH
    )
    loss, correct = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(pairs), 4):
            batch = collate_pairs(
                pairs[start : start + 4], packing=False, pad_token_id=tokenizer.pad_token_id
            )
            loss_sum, sums = dpo_loss_sum(
                model, batch, "cpu", peft_model=model, beta=BETA, loss_type="sigmoid"
            )
            loss += float(loss_sum)
            correct += sums["rewards/accuracies"]
    return {"loss": loss / len(pairs), "reward_accuracy": correct / len(pairs)}


def last_mean(rows: list[dict], key: str, count: int = 4) -> float:
    values = [row[key] for row in rows if key in row][-count:]
    return sum(values) / len(values)


def run_corral(workdir: Path, steps: int) -> dict:
    from corral.training.config import TrainConfig
    from corral.training.loop import train

    from corral.config import load_config
    from corral.rundir import read_metrics, read_summary

    run_dir = workdir / "corral_run"
    config = load_config(
        TrainConfig,
        None,
        [
            "model=embedded",
            f"data={workdir / 'train.jsonl'}",
            "template=alpaca",
            f"max_length={MAX_LENGTH}",
            "method=dpo",
            f"beta={BETA}",
            "loss_type=sigmoid",
            f"lora_r={LORA['r']}",
            f"lora_alpha={LORA['alpha']}",
            f"lora_dropout={LORA['dropout']}",
            f"lora_target_modules=[{','.join(LORA['targets'])}]",
            "precision=fp32",
            f"micro_batch_size={BATCH}",
            "gradient_accumulation_steps=1",
            "group_by_length=true",
            "packing=false",
            "max_tokens_per_forward=512",
            f"max_steps={steps}",
            f"learning_rate={LEARNING_RATE}",
            "lr_scheduler=constant",
            "warmup_steps=0",
            "max_grad_norm=1.0",
            f"seed={SEED}",
            "val_size=0",
            "save_steps=0",
            "report_to=[none]",
            f"output_dir={run_dir}",
        ],
    )
    train(config)
    peak = peak_rss_gb()
    summary = read_summary(run_dir)
    rows = read_metrics(run_dir)
    return {
        "tokens_per_s": summary["session_tokens_per_s"],
        "tokens": summary["session_tokens"],
        "train_seconds": summary["session_train_seconds"],
        "peak_rss_gb": peak,
        "final_train_loss": last_mean(rows, "loss"),
        "final_train_reward_accuracy": last_mean(rows, "rewards/accuracies"),
        "adapter": str(run_dir),
    }


def run_trl(workdir: Path, steps: int) -> dict:
    import datasets
    import torch
    from corral.training.preference import read_preferences
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from corral.models import load_model, load_tokenizer, quiet_transformers
    from corral.templates import get_template

    with quiet_transformers():
        tokenizer = load_tokenizer("embedded")
        model = load_model("embedded", dtype=torch.float32, tokenizer=tokenizer)
    template = get_template("alpaca", tokenizer)
    rows = [
        {
            "prompt": template.format_prompt(pair["prompt"], pair["input"]),
            "chosen": template.format_completion(pair["chosen"]),
            "rejected": template.format_completion(pair["rejected"]),
        }
        for pair in read_preferences(workdir / "train.jsonl")
    ]
    out_dir = workdir / "trl_run"
    args = DPOConfig(
        output_dir=str(out_dir),
        max_length=MAX_LENGTH,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        optim="adamw_torch",
        beta=BETA,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["targets"],
        task_type="CAUSAL_LM",
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    result = trainer.train()
    peak = peak_rss_gb()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    tokens = logged[-1]["num_tokens"]
    seconds = result.metrics["train_runtime"]
    adapter = out_dir / "adapter"
    trainer.model.save_pretrained(adapter)
    return {
        "tokens_per_s": tokens / seconds,
        "tokens": tokens,
        "train_seconds": seconds,
        "peak_rss_gb": peak,
        "final_train_loss": last_mean(logged, "loss"),
        "final_train_reward_accuracy": last_mean(logged, "rewards/accuracies"),
        "adapter": str(adapter),
    }


def child(role: str, workdir: Path, steps: int) -> None:
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    result = run_corral(workdir, steps) if role == "corral" else run_trl(workdir, steps)
    held_out = evaluate_adapter(Path(result["adapter"]), workdir / "heldout.jsonl")
    trained_on = evaluate_adapter(Path(result["adapter"]), workdir / "train.jsonl")
    result["eval_loss"] = held_out["loss"]
    result["eval_reward_accuracy"] = held_out["reward_accuracy"]
    result["train_reward_accuracy"] = trained_on["reward_accuracy"]
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps for each trainer")
    parser.add_argument("--role", choices=("corral", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        if args.core is not None:
            os.sched_setaffinity(0, {args.core})
        child(args.role, args.workdir, args.steps)
        return

    with tempfile.TemporaryDirectory(prefix="corral-dpo-bench-") as tmp:
        workdir = Path(tmp)
        build_pairs(workdir, args.steps)
        cores = sorted(os.sched_getaffinity(0))
        procs = {}
        started = time.monotonic()
        for position, role in enumerate(("corral", "trl")):
            procs[role] = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    role,
                    "--workdir",
                    str(workdir),
                    "--steps",
                    str(args.steps),
                    "--core",
                    str(cores[position % len(cores)]),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
            )
        results = {}
        for role, proc in procs.items():
            out, err = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"{role} failed:\n{err[-4000:]}")
            results[role] = json.loads(out.strip().splitlines()[-1])
            print(
                f"{role}: {json.dumps(results[role])} ({time.monotonic() - started:.0f} s)",
                file=sys.stderr,
            )
    corral, trl = results["corral"], results["trl"]
    report = {"steps": args.steps, "pairs_per_step": BATCH, "max_length": MAX_LENGTH, "beta": BETA}
    for key, digits in (
        ("tokens_per_s", 2),
        ("peak_rss_gb", 3),
        ("final_train_loss", 4),
        ("final_train_reward_accuracy", 3),
        ("eval_loss", 4),
        ("eval_reward_accuracy", 3),
        ("train_reward_accuracy", 3),
        ("tokens", 0),
        ("train_seconds", 1),
    ):
        for name, result in (("corral", corral), ("trl", trl)):
            report[f"{name}_{key}"] = round(result[key], digits) if digits else result[key]
    report["tokens_per_s_ratio"] = round(corral["tokens_per_s"] / trl["tokens_per_s"], 3)
    report["peak_rss_ratio"] = round(corral["peak_rss_gb"] / trl["peak_rss_gb"], 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

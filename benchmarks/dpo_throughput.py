"""DPO throughput and memory: Corral's `method=dpo` against TRL's DPOTrainer, in the same run.

    .venv/bin/python -m benchmarks.dpo_throughput [--steps 16]

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
import random
import sys
import tempfile
from pathlib import Path

from benchmarks.trainer_race import (
    MAX_LENGTH,
    SEED,
    add_racer_arguments,
    embedded_for_trl,
    enter_race,
    peak_rss_gb,
    race,
    run_corral,
    trl_arguments,
    trl_lora,
)
from corral.rundir import read_metrics

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "data_gen" / "seeds" / "default_seed_tasks.jsonl"
SMOKE_PAIRS = REPO / "configs" / "training" / "smoke_preferences.jsonl"
BATCH = 4  # pairs per optimizer step
HELD_OUT = 16
LORA_DROPOUT = 0.0
BETA = 0.1


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


def run_corral_dpo(workdir: Path, steps: int) -> dict:
    run_dir = workdir / "corral_run"
    settings = ["method=dpo", f"beta={BETA}", "loss_type=sigmoid", "precision=fp32",
                "max_tokens_per_forward=512"]  # fmt: skip
    result = run_corral(
        run_dir,
        workdir / "train.jsonl",
        steps=steps,
        batch=BATCH,
        lora_dropout=LORA_DROPOUT,
        settings=settings,
    )
    rows = read_metrics(run_dir)
    return {
        **result,
        "final_train_loss": last_mean(rows, "loss"),
        "final_train_reward_accuracy": last_mean(rows, "rewards/accuracies"),
    }


def run_trl(workdir: Path, steps: int) -> dict:
    import datasets
    from corral.training.preference import read_preferences
    from trl import DPOConfig, DPOTrainer

    model, tokenizer, template = embedded_for_trl()
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
        **trl_arguments(out_dir, steps=steps, batch=BATCH),
        beta=BETA,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=trl_lora(LORA_DROPOUT),
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
    result = run_corral_dpo(workdir, steps) if role == "corral" else run_trl(workdir, steps)
    held_out = evaluate_adapter(Path(result["adapter"]), workdir / "heldout.jsonl")
    trained_on = evaluate_adapter(Path(result["adapter"]), workdir / "train.jsonl")
    result["eval_loss"] = held_out["loss"]
    result["eval_reward_accuracy"] = held_out["reward_accuracy"]
    result["train_reward_accuracy"] = trained_on["reward_accuracy"]
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps for each trainer")
    add_racer_arguments(parser, ("corral", "trl"))
    args = parser.parse_args()
    if args.role:
        enter_race(args.core)
        child(args.role, args.workdir, args.steps)
        return

    with tempfile.TemporaryDirectory(prefix="corral-dpo-bench-") as tmp:
        workdir = Path(tmp)
        build_pairs(workdir, args.steps)
        steps = ["--steps", str(args.steps)]
        results = race("benchmarks.dpo_throughput", ["corral", "trl"], workdir, steps)
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

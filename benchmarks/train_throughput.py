"""Training throughput and memory: Corral against TRL's SFTTrainer, measured in the same run.

    .venv/bin/python -m benchmarks.train_throughput [--steps 16] [--seed-tasks PATH]

Both trainers fine-tune the embedded model (SmolLM2-135M-Instruct) with LoRA r 8 / alpha 16 /
dropout 0.05 on q_proj and v_proj, fp32 on the CPU, batch 8 examples per optimizer step, maximum
length 256, the same learning rate, constant schedule and step count, on the same Alpaca-template
records built from the Self-Instruct seed tasks, with the loss on the completion only. Each
trainer runs in its own process, so peak RSS (ru_maxrss) is its own. Then each trained adapter is
scored by the same function on the same held-out records (token-weighted completion loss).

What is measured:
- tokens_per_s: non-padding tokens (prompt and completion alike) per second of the training
  steps, excluding model loading and evaluation (Corral: its step timer; TRL: the Trainer's
  non-padding token count over its train_runtime);
- peak_rss_gb: the process's peak resident memory up to the end of training.

The two trainers run concurrently, each pinned to its own CPU core with one thread: both see the
same machine, including whatever else runs on it, for the whole measurement.

Model FLOPs utilisation, the way GPU tools report it: each process first measures its core's
matrix-multiply ceiling (fp32 and bf16 GEMMs at the model's MLP shape, one thread), then
MFU = tokens/s x model FLOPs per token / ceiling, with model FLOPs per token of a LoRA step =
4 N_mm (forward, and the input gradients the frozen weights still need) + 6 N_adapter + 12 L d l
(attention, l the mean example length), N_mm counting every weight that multiplies (the
vocabulary projection included). `--roles corral corral_bf16` compares Corral in fp32 and in bf16
(autocast on CPUs with native bf16) instead of Corral and TRL.

Corral runs its settings for speed and memory: length-grouped batches, logits only at trained
positions, and `--max-tokens-per-forward 256` (each 8-example batch runs as forward passes of at
most 256 padded tokens; the optimizer step and its gradient are the same, the activations held at
once are fewer). TRL runs its SFTTrainer
defaults (padding to the longest example of each batch). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from corral.training.mfu import Architecture, flops_per_token

from benchmarks.trainer_race import (
    LORA_RANK,
    LORA_TARGETS,
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
from corral.models import resolve_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SEEDS = REPO.parent / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"
BATCH = 8
LORA_DROPOUT = 0.05
EVAL_RECORDS = 24
ROLES = ("corral", "corral_bf16", "trl")


def build_data(seed_tasks: Path, workdir: Path, steps: int) -> tuple[Path, Path]:
    """Alpaca records (one per seed-task instance) that fit MAX_LENGTH, split train / held-out.

    The training file holds exactly `steps * BATCH` records, so in one epoch both trainers learn
    from the same examples; only the order and grouping of batches differ between them.
    """
    from corral.training.data import tokenize_record

    from corral.models import load_tokenizer
    from corral.records import read_seed_tasks, write_alpaca
    from corral.templates import get_template

    tokenizer = load_tokenizer("embedded")
    template = get_template("alpaca", tokenizer)
    records = []
    for seed in read_seed_tasks(seed_tasks):
        for instance in seed.instances:
            record = {"instruction": seed.instruction, **instance}
            example, _ = tokenize_record(record, 0, tokenizer, template, max_length=MAX_LENGTH)
            if example is not None:  # neither trainer has to drop or truncate anything
                records.append(record)
    random.Random(SEED).shuffle(records)
    train_path, eval_path = workdir / "train.json", workdir / "eval.json"
    write_alpaca(eval_path, records[:EVAL_RECORDS])
    write_alpaca(train_path, records[EVAL_RECORDS : EVAL_RECORDS + steps * BATCH])
    return train_path, eval_path


def evaluate_adapter(adapter_dir: Path, eval_path: Path) -> float:
    """Token-weighted mean cross-entropy over the completions of the held-out records."""
    import torch
    from corral.training.batches import collate_padded, completion_loss_sum
    from corral.training.data import tokenize_records
    from peft import PeftModel

    from corral.models import load_model, load_tokenizer, quiet_transformers
    from corral.records import read_alpaca
    from corral.templates import get_template

    with quiet_transformers():
        tokenizer = load_tokenizer("embedded")
        base = load_model("embedded", dtype=torch.float32, tokenizer=tokenizer)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    template = get_template("alpaca", tokenizer)
    examples, _ = tokenize_records(
        read_alpaca(eval_path), tokenizer, template, max_length=MAX_LENGTH
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 4):
            batch = collate_padded(examples[start : start + 4], tokenizer.pad_token_id)
            loss_sum, n = completion_loss_sum(model, batch, "cpu")
            total, count = total + float(loss_sum), count + n
    return total / count


def gemm_ceiling(dtype_name: str, seconds: float = 2.0) -> float:
    """FLOP/s of this core for a [512 x hidden] @ [hidden x intermediate] matmul in `dtype`."""
    import torch

    config = json.loads((Path(resolve_model("embedded")) / "config.json").read_text())
    dtype = getattr(torch, dtype_name)
    a = torch.randn(512, config["hidden_size"], dtype=dtype)
    b = torch.randn(config["hidden_size"], config["intermediate_size"], dtype=dtype)
    for _ in range(3):
        a @ b  # warm up
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return count * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - started)


def lora_flops_per_token(mean_length: float) -> float:
    """Model FLOPs per token of this benchmark's LoRA step (corral.training.mfu)."""
    config = json.loads((Path(resolve_model("embedded")) / "config.json").read_text())
    arch = Architecture.from_config(config)
    adapter = arch.lora_params(LORA_RANK, LORA_TARGETS)
    flops = flops_per_token(arch, method="lora", adapter_params=adapter, context=mean_length)
    return flops["flops_per_token"]


def run_corral_sft(
    train_path: Path, workdir: Path, steps: int, precision: str, max_tokens_per_forward: int
) -> dict:
    settings = ["method=lora", f"precision={precision}",
                f"max_tokens_per_forward={max_tokens_per_forward}"]  # fmt: skip
    result = run_corral(
        workdir / "corral_run",
        train_path,
        steps=steps,
        batch=BATCH,
        lora_dropout=LORA_DROPOUT,
        settings=settings,
    )
    return {"precision": precision, **result}


def run_trl(train_path: Path, workdir: Path, steps: int) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer

    from corral.records import read_alpaca

    model, tokenizer, template = embedded_for_trl()
    rows = []
    for record in read_alpaca(train_path):
        prompt, completion = template.format_example(
            record["instruction"], record["input"], record["output"]
        )
        rows.append({"prompt": prompt, "completion": completion})
    out_dir = workdir / "trl_run"
    args = SFTConfig(
        **trl_arguments(out_dir, steps=steps, batch=BATCH),
        completion_only_loss=True,
        packing=False,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=trl_lora(LORA_DROPOUT),
    )
    result = trainer.train()
    peak = peak_rss_gb()
    tokens = trainer.state.num_input_tokens_seen
    seconds = result.metrics["train_runtime"]
    adapter = out_dir / "adapter"
    trainer.model.save_pretrained(adapter)
    return {
        "precision": "fp32",
        "tokens_per_s": tokens / seconds,
        "tokens": tokens,
        "train_seconds": seconds,
        "peak_rss_gb": peak,
        "adapter": str(adapter),
    }


def child(role: str, workdir: Path, steps: int, max_tokens_per_forward: int) -> None:
    train_path, eval_path = workdir / "train.json", workdir / "eval.json"
    ceilings = {name: gemm_ceiling(name) for name in ("float32", "bfloat16")}
    if role == "trl":
        result = run_trl(train_path, workdir, steps)
    else:
        precision = "bf16" if role == "corral_bf16" else "fp32"
        result = run_corral_sft(
            train_path, workdir / role, steps, precision, max_tokens_per_forward
        )
    result["eval_loss"] = evaluate_adapter(Path(result["adapter"]), eval_path)
    result["gemm_ceiling_gflops"] = {k: round(v / 1e9, 1) for k, v in ceilings.items()}
    from corral.models import load_tokenizer
    from corral.records import read_alpaca
    from corral.templates import get_template

    tokenizer = load_tokenizer("embedded")
    template = get_template("alpaca", tokenizer)
    lengths = [
        len(tokenizer("".join(template.format_example(r["instruction"], r["input"], r["output"])))
            ["input_ids"])
        for r in read_alpaca(train_path)
    ]  # fmt: skip
    per_token = lora_flops_per_token(sum(lengths) / len(lengths))
    ceiling = ceilings["bfloat16" if result["precision"] == "bf16" else "float32"]
    result["flops_per_token"] = per_token
    result["mfu"] = round(result["tokens_per_s"] * per_token / ceiling, 4)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps for each trainer")
    parser.add_argument(
        "--seed-tasks", type=Path, default=DEFAULT_SEEDS, help="Self-Instruct seeds"
    )
    parser.add_argument(
        "--roles",
        nargs=2,
        default=["corral", "trl"],
        choices=ROLES,
        help="the two measured side by side (default: corral trl)",
    )
    parser.add_argument(
        "--max-tokens-per-forward",
        type=int,
        default=256,
        help="Corral's forward-pass token budget per micro-batch (0: one pass per batch)",
    )
    add_racer_arguments(parser, ROLES)
    args = parser.parse_args()
    if args.role:
        enter_race(args.core)
        child(args.role, args.workdir, args.steps, args.max_tokens_per_forward)
        return

    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        workdir = Path(tmp)
        build_data(args.seed_tasks, workdir, args.steps)
        arguments = ["--steps", str(args.steps),
                     "--max-tokens-per-forward", str(args.max_tokens_per_forward)]  # fmt: skip
        results = race("benchmarks.train_throughput", args.roles, workdir, arguments)
    first, second = (results[role] for role in args.roles)
    report = {"roles": args.roles, "steps": args.steps, "batch_size": BATCH,
              "max_length": MAX_LENGTH,
              "corral_max_tokens_per_forward": args.max_tokens_per_forward}  # fmt: skip
    for role in args.roles:
        r = results[role]
        report[role] = {
            "precision": r["precision"],
            "tokens_per_s": round(r["tokens_per_s"], 2),
            "tokens": r["tokens"],
            "peak_rss_gb": round(r["peak_rss_gb"], 3),
            "eval_loss": round(r["eval_loss"], 4),
            "mfu": r["mfu"],
            "gemm_ceiling_gflops": r["gemm_ceiling_gflops"],
        }
    report["tokens_per_s_ratio"] = round(first["tokens_per_s"] / second["tokens_per_s"], 3)
    report["peak_rss_ratio"] = round(first["peak_rss_gb"] / second["peak_rss_gb"], 3)
    report["eval_loss_relative_difference"] = round(
        abs(first["eval_loss"] - second["eval_loss"]) / second["eval_loss"], 4
    )
    report["flops_per_token"] = round(first["flops_per_token"])
    print(json.dumps(report))


if __name__ == "__main__":
    main()

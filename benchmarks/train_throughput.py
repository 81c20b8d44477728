"""Training throughput and memory: Corral against TRL's SFTTrainer, measured in the same run.

    .venv/bin/python benchmarks/train_throughput.py [--steps 16] [--seed-tasks PATH]

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

DEFAULT_SEEDS = REPO.parent / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"
MAX_LENGTH = 256
BATCH = 8
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
LEARNING_RATE = 2e-4
SEED = 42
EVAL_RECORDS = 24


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


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

    from corral.models import resolve_model

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


def flops_per_token(mean_length: float) -> float:
    """Model FLOPs per token of a LoRA step (module docstring)."""
    from corral.models import resolve_model

    c = json.loads((Path(resolve_model("embedded")) / "config.json").read_text())
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head = h // c["num_attention_heads"]
    kv = head * c.get("num_key_value_heads", c["num_attention_heads"])
    n_mm = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + c["vocab_size"] * h
    n_adapter = layers * LORA["r"] * (2 * h + (h + kv))  # r x (in + out) on q_proj and v_proj
    return 4 * n_mm + 6 * n_adapter + 12 * layers * h * mean_length


def run_corral(
    train_path: Path,
    workdir: Path,
    steps: int,
    precision: str,
    max_tokens_per_forward: int,
) -> dict:
    from corral.training.config import TrainConfig
    from corral.training.loop import train

    from corral.config import load_config
    from corral.rundir import read_summary

    run_dir = workdir / "corral_run"
    config = load_config(
        TrainConfig,
        None,
        [
            "model=embedded",
            f"data={train_path}",
            "template=alpaca",
            f"max_length={MAX_LENGTH}",
            "method=lora",
            f"lora_r={LORA['r']}",
            f"lora_alpha={LORA['alpha']}",
            f"lora_dropout={LORA['dropout']}",
            f"lora_target_modules=[{','.join(LORA['targets'])}]",
            f"precision={precision}",
            f"micro_batch_size={BATCH}",
            "gradient_accumulation_steps=1",
            f"max_tokens_per_forward={max_tokens_per_forward}",
            "group_by_length=true",
            "packing=false",
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
    return {
        "precision": precision,
        "tokens_per_s": summary["session_tokens_per_s"],
        "tokens": summary["session_tokens"],
        "train_seconds": summary["session_train_seconds"],
        "peak_rss_gb": peak,
        "adapter": str(run_dir),
    }


def run_trl(train_path: Path, workdir: Path, steps: int) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from corral.models import load_model, load_tokenizer, quiet_transformers
    from corral.records import read_alpaca
    from corral.templates import get_template

    with quiet_transformers():
        tokenizer = load_tokenizer("embedded")
        model = load_model("embedded", dtype=torch.float32, tokenizer=tokenizer)
    template = get_template("alpaca", tokenizer)
    rows = []
    for record in read_alpaca(train_path):
        prompt, completion = template.format_example(
            record["instruction"], record["input"], record["output"]
        )
        rows.append({"prompt": prompt, "completion": completion})
    out_dir = workdir / "trl_run"
    args = SFTConfig(
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
        completion_only_loss=True,
        packing=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["targets"],
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
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
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    train_path, eval_path = workdir / "train.json", workdir / "eval.json"
    ceilings = {name: gemm_ceiling(name) for name in ("float32", "bfloat16")}
    if role == "trl":
        result = run_trl(train_path, workdir, steps)
    else:
        precision = "bf16" if role == "corral_bf16" else "fp32"
        result = run_corral(train_path, workdir / role, steps, precision, max_tokens_per_forward)
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
    per_token = flops_per_token(sum(lengths) / len(lengths))
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
        choices=("corral", "corral_bf16", "trl"),
        help="the two measured side by side (default: corral trl)",
    )
    parser.add_argument(
        "--max-tokens-per-forward",
        type=int,
        default=256,
        help="Corral's forward-pass token budget per micro-batch (0: one pass per batch)",
    )
    parser.add_argument("--role", choices=("corral", "corral_bf16", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        if args.core is not None:
            os.sched_setaffinity(0, {args.core})
        child(args.role, args.workdir, args.steps, args.max_tokens_per_forward)
        return

    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        workdir = Path(tmp)
        build_data(args.seed_tasks, workdir, args.steps)
        # Both trainers run at the same time, each pinned to its own core with one thread, so
        # both see the same machine (other work on it included) for the whole measurement.
        cores = sorted(os.sched_getaffinity(0))
        procs = {}
        started = time.monotonic()
        for position, role in enumerate(args.roles):
            core = cores[position % len(cores)]
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
                    "--max-tokens-per-forward",
                    str(args.max_tokens_per_forward),
                    "--core",
                    str(core),
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

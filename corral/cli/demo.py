"""`corral demo`: Corral end to end on the embedded model, on this machine, in a few minutes.

1. generate a small Alpaca dataset with the embedded model as teacher (stage 1);
2. train a LoRA on it with the Dolly template, whose answers end with `### End` (stage 2);
3. answer held-out instructions with the base and the tuned model side by side (stage 3), and
   count how often each closes its answer with the trained end marker: the base model has never
   seen `### End`, the tuned one has learned it;
4. write an HTML report of the data and the run.

With `--stage2`, the step DeepSpeed-Chat and Zephyr take after supervised tuning:
5. DPO from the tuned run's adapter (the reference policy is that adapter, frozen) on preference
   pairs: the 40 hand-written pairs of `configs/training/smoke_preferences.jsonl`, because a 135M
   judge picks by position and keeps almost no pair consistent in both orders (with a real judge,
   `corral generate --mode preferences` makes them from your data);
6. answer the held-out instructions with the SFT and the DPO run, judge every pair in both orders,
   and print the win rate of DPO over SFT with the DPO run's held-out reward accuracy.

Every step resumes: run it again and finished steps are reused (generation continues its
journal, training its last checkpoint).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from corral.rundir import RunDir, read_summary

# Held out: not among the seed tasks, not generated from them on purpose, not in any training file.
HELD_OUT_INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "Name two planets of the solar system.",
    "Suggest a title for a short story about a lost key.",
    "Explain what a thermometer measures.",
    "Write one sentence that thanks a friend for a gift.",
]
DEMO_TEMPLATE = "dolly"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="demo_output", help="where the demo writes")
    parser.add_argument("--num-instructions", type=int, default=24, help="records to generate")
    parser.add_argument("--epochs", type=float, default=3, help="LoRA training epochs")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    parser.add_argument(
        "--fresh", action="store_true", help="start over instead of reusing earlier results"
    )
    parser.add_argument(
        "--stage2",
        action="store_true",
        help="then DPO from the tuned run on preference pairs, and its win rate over it",
    )


class _Steps:
    """Numbered step banners, each followed by the time its step took."""

    def __init__(self, total: int) -> None:
        self.total, self.number, self.started, self.times = total, 0, 0.0, {}

    def begin(self, text: str) -> None:
        self.end()
        self.number += 1
        name = text.split(" ")[0]
        # A later step of the same verb (stage 2 answers again) is named by its number too.
        self.name = name if name not in self.times else f"{name} ({self.number})"
        self.started = time.monotonic()
        print(f"\n=== [{self.number}/{self.total}] {text}", flush=True)

    def end(self) -> None:
        if self.number and self.name not in self.times:
            self.times[self.name] = time.monotonic() - self.started
            print(f"--- step {self.number} took {self.times[self.name]:.1f} s", flush=True)


def generate_step(out: Path, num_instructions: int, fresh: bool) -> tuple[Path, Path]:
    from corral.data_gen.pipeline import format_summary, generate_demo_dataset

    data_dir = out / "data"
    if fresh and data_dir.exists():
        shutil.rmtree(data_dir)
    result = generate_demo_dataset(data_dir, num_instructions)
    print(format_summary(result))
    return result.output_path, result.manifest_path


def train_step(out: Path, data: Path, epochs: float, fresh: bool) -> Path:
    from corral.training.demo import train_demo_adapter

    run_dir = out / "run"
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    # resume=auto: a finished run is reused, an interrupted one continues from its checkpoint.
    return Path(train_demo_adapter(data, run_dir, epochs=epochs, resume="auto"))


def compare_step(run_dir: Path, max_new_tokens: int) -> dict[str, list]:
    from corral.inference.generation import compare_base_and_tuned

    # The base is prompted exactly as the tuned model (the run's template): any difference,
    # `### End` included, comes from the training.
    base, tuned = compare_base_and_tuned(
        run_dir, HELD_OUT_INSTRUCTIONS, max_new_tokens=max_new_tokens
    )
    answers = {"base": base, "tuned": tuned}
    for index, instruction in enumerate(HELD_OUT_INSTRUCTIONS):
        print(f"\n### {instruction}")
        for role in ("base", "tuned"):
            answer = answers[role][index]
            closed = "ends with ### End" if answer.end_marker_found else "no ### End"
            text = " ".join(answer.text.split())
            print(f"  {role:>5} [{closed}]: {text[:160]}{'…' if len(text) > 160 else ''}")
    n = len(HELD_OUT_INSTRUCTIONS)
    print("\nFormat adherence (answer closed with the trained end marker `### End`):")
    for role in ("base", "tuned"):
        closed = sum(a.end_marker_found for a in answers[role])
        print(f"  {role:>5}: {closed}/{n}")
    return answers


def dpo_step(out: Path, sft_run: Path, fresh: bool) -> Path:
    from corral.config import load_config
    from corral.training.config import TrainConfig
    from corral.training.loop import train

    run_dir = out / "run_dpo"
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    preset = Path(__file__).resolve().parents[1] / "configs" / "training" / "dpo_smoke.yaml"
    overrides = [
        f"init_adapter={sft_run}",
        f"template={DEMO_TEMPLATE}",  # the policy is asked as the SFT run learned
        f"output_dir={run_dir}",
        "max_steps=8",
        "eval_steps=8",
        "save_steps=8",
        "report_to=[none]",
        "resume=auto",
    ]
    return Path(train(load_config(TrainConfig, preset, overrides)))


def win_rate_step(sft_run: Path, dpo_run: Path, max_new_tokens: int) -> dict[str, float]:
    from corral.data_gen.judges import LocalJudge, combine_orders, judge_prompt
    from corral.inference.generation import answer_instructions

    sft = answer_instructions(sft_run, HELD_OUT_INSTRUCTIONS, max_new_tokens=max_new_tokens)
    dpo = answer_instructions(dpo_run, HELD_OUT_INSTRUCTIONS, max_new_tokens=max_new_tokens)
    judge = LocalJudge("embedded")
    try:
        prompts = [
            judge_prompt(i, "", s.text, d.text)
            for i, s, d in zip(HELD_OUT_INSTRUCTIONS, sft, dpo, strict=True)
        ]
        prompts += [
            judge_prompt(i, "", d.text, s.text)
            for i, s, d in zip(HELD_OUT_INSTRUCTIONS, sft, dpo, strict=True)
        ]
        verdicts = judge.judge(prompts)
    finally:
        judge.close()
    n = len(HELD_OUT_INSTRUCTIONS)
    outcomes = [combine_orders(a, b) for a, b in zip(verdicts[:n], verdicts[n:], strict=True)]
    for instruction, s, d, outcome in zip(HELD_OUT_INSTRUCTIONS, sft, dpo, outcomes, strict=True):
        print(f"\n### {instruction}  [judge: {'dpo' if outcome == 'tuned' else outcome}]")
        for role, answer in (("sft", s), ("dpo", d)):
            text = " ".join(answer.text.split())
            print(f"  {role:>5}: {text[:160]}{'…' if len(text) > 160 else ''}")
    rates = {"dpo": outcomes.count("tuned") / n, "sft": outcomes.count("base") / n}
    rates["tie"] = outcomes.count("tie") / n
    summary = read_summary(dpo_run)
    accuracy = summary.get("eval_metrics", {}).get("rewards/accuracies")
    print(
        f"\nWin rate of DPO over SFT (embedded judge, both orders): DPO {rates['dpo']:.0%}, SFT "
        f"{rates['sft']:.0%}, ties {rates['tie']:.0%}. A 135M judge mostly names the same letter "
        "in both orders, which counts as a tie: judge with a stronger model (corral eval "
        "--judge-base-url) for a verdict."
    )
    if accuracy is not None:
        print(f"DPO's held-out reward accuracy (chosen ranked above rejected): {accuracy:.0%}")
    return rates


def run_demo(args: argparse.Namespace) -> int:
    from corral.evaluation.report import write_report
    from corral.models import resolve_model

    started = time.monotonic()
    out = Path(args.output_dir)
    print(f"Corral demo: the embedded model ({resolve_model('embedded')}) end to end.")

    stage2 = getattr(args, "stage2", False)
    steps = _Steps(6 if stage2 else 4)
    steps.begin(f"generate {args.num_instructions} instructions with the embedded teacher")
    data, manifest = generate_step(out, args.num_instructions, args.fresh)

    steps.begin(f"train a LoRA on them ({args.epochs:g} epochs, template {DEMO_TEMPLATE})")
    run_dir = train_step(out, data, args.epochs, args.fresh)

    steps.begin("answer held-out instructions: base vs tuned")
    compare_step(run_dir, args.max_new_tokens)

    steps.begin("report")
    from corral.data_gen.config import GenerateConfig

    seeds = GenerateConfig().seed_tasks_path()
    report = write_report([data, run_dir], out / "report.html", seed_tasks=seeds)
    dpo_run = None
    if stage2:
        steps.begin("DPO from the tuned run's adapter on preference pairs (stage 2)")
        dpo_run = dpo_step(out, run_dir, args.fresh)
        steps.begin("answer held-out instructions: SFT vs DPO, judged in both orders")
        win_rate_step(run_dir, dpo_run, args.max_new_tokens)

    steps.end()
    timing = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in steps.times.items())
    print(f"\nDone in {time.monotonic() - started:.0f} s ({timing}). Written:")
    for label, path in (
        ("data", data),
        ("manifest", manifest),
        ("run (adapter)", run_dir),
        ("metrics", RunDir(run_dir).metrics_file),
        ("report", report),
        *((("run (DPO)", dpo_run),) if dpo_run else ()),
    ):
        print(f"  {label:<14} {path}")
    print(
        f"Next: corral chat --run {run_dir} | corral serve --run {run_dir} | corral eval --tuned {run_dir} ..."
    )
    return 0

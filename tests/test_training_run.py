"""End-to-end training runs through `accelerate launch train.py`: the smoke config with LoRA and
QLoRA on the embedded model, 2-process DDP, SIGKILL + resume, SIGTERM, export, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from servers import wait_until

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
SMOKE = REPO / "configs" / "training" / "smoke.yaml"
SMOKE_DATA = REPO / "configs" / "training" / "smoke_alpaca.json"


def launch(
    *args: str, extra_env: dict | None = None, timeout: float = 300, launcher=()
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "2",
        **(extra_env or {}),
    }
    cmd = [ACCELERATE, "launch", *launcher, "train.py", *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_losses(run_dir: Path) -> list[float]:
    return [m["eval_loss"] for m in metrics(run_dir) if "eval_loss" in m]


def tiny_args(run_dir: Path, *more: str) -> list[str]:
    return [
        "--config",
        str(SMOKE),
        "model=tiny-random",
        f"data={SMOKE_DATA}",
        f"output_dir={run_dir}",
        "report_to=[none]",
        *more,
    ]


def first_prompt_logits(model, tokenizer) -> torch.Tensor:
    from corral.templates import get_template

    prompt = get_template("alpaca", tokenizer).format_prompt("Name a fruit that is yellow.")
    with torch.no_grad():
        return model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]


def assert_adapter_trained_and_changes_output(run_dir: Path, embedded_model, embedded_tokenizer):
    from peft import PeftModel

    adapter = load_file(str(run_dir / "adapter_model.safetensors"))
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "the saved adapter is empty"
    base_logits = first_prompt_logits(embedded_model, embedded_tokenizer)
    # The fixture model must stay untouched: wrap a fresh copy of the base.
    from corral.models import load_model

    base = load_model("embedded", dtype=torch.float32, tokenizer=embedded_tokenizer)
    tuned = PeftModel.from_pretrained(base, run_dir)
    tuned.eval()
    tuned_logits = first_prompt_logits(tuned, embedded_tokenizer)
    assert (tuned_logits - base_logits).abs().max() > 1e-3


@pytest.mark.slow
def test_smoke_config_trains_embedded_lora(tmp_path, embedded_model, embedded_tokenizer):
    run_dir = tmp_path / "smoke"
    result = launch("--config", str(SMOKE), f"output_dir={run_dir}")
    assert "resolved config" in result.stdout and "method: lora" in result.stdout
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "corral_config.yaml",
        "run_info.json",
        "metrics.jsonl",
    ):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    assert (run_dir / "checkpoints" / "checkpoint-10").is_dir()
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["base_model"] == "embedded" and info["method"] == "lora"
    assert info["template"] == "alpaca" and info["end_marker"] == "<|im_end|>"
    assert info["max_length"] == 256
    saved = (run_dir / "corral_config.yaml").read_text()
    assert f"output_dir: {run_dir}" in saved
    losses = eval_losses(run_dir)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.1, losses
    steps = [m for m in metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 11))
    assert all(m["tokens_per_s"] > 0 and m["lr"] >= 0 for m in steps)
    assert_adapter_trained_and_changes_output(run_dir, embedded_model, embedded_tokenizer)


@pytest.mark.slow
def test_smoke_config_trains_embedded_qlora(tmp_path, embedded_model, embedded_tokenizer):
    run_dir = tmp_path / "qlora"
    launch(
        "--config",
        str(SMOKE),
        "method=qlora",
        "max_steps=3",
        "eval_steps=0",
        "save_steps=0",
        f"output_dir={run_dir}",
    )
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["method"] == "qlora"
    losses = eval_losses(run_dir)
    assert losses[-1] < losses[0], losses
    assert all(m.get("grad_norm", 1) > 0 for m in metrics(run_dir))
    assert_adapter_trained_and_changes_output(run_dir, embedded_model, embedded_tokenizer)


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_adapters(tmp_path):
    run_dir = tmp_path / "ddp"
    result = launch(
        *tiny_args(
            run_dir,
            "max_steps=3",
            "micro_batch_size=2",
            "gradient_accumulation_steps=2",
            "packing=false",
        ),
        launcher=("--multi_gpu", "--num_processes", "2", "--main_process_port", "29533"),
        extra_env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
    )
    assert "2 process(es)" in result.stdout
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    first, second = summary["rank_fingerprints"]
    assert first == second
    checkpoint = run_dir / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "random_states_0.pkl").is_file() and (
        checkpoint / "random_states_1.pkl"
    ).is_file()


def _start(args: list[str], log_dir: Path) -> subprocess.Popen:
    """Start a run in its own process group; output goes to files (a full pipe would block it)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.txt", "w") as out, open(log_dir / "stderr.txt", "w") as err:
        return subprocess.Popen(
            [ACCELERATE, "launch", "train.py", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, as a scheduler would signal it
        )


def _ended(proc: subprocess.Popen) -> str | None:
    if proc.poll() is None:
        return None
    return f"the run ended early with exit status {proc.returncode}"


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str) -> None:
    wait_until(predicate, timeout=timeout, what=what, alive=lambda: _ended(proc), interval=0.02)


def _wait_group_gone(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until every process of the run's group has exited (the launcher and its worker)."""
    pgid = proc.pid

    def group_gone() -> bool:
        proc.poll()  # reap the launcher, or it lingers as a zombie in the group
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        wait_until(
            group_gone, timeout=timeout, what="the run's processes after the signal", interval=0.05
        )
    except TimeoutError:
        os.killpg(pgid, signal.SIGKILL)
        raise


@pytest.fixture(scope="module")
def slow_tiny_model(tmp_path_factory, tiny_model_path) -> Path:
    """A wider random LLaMA: slow enough per step that a signal lands mid-run."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("slow-tiny")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def resume_args(model: Path) -> list[str]:
    return [
        "--config",
        str(SMOKE),
        f"model={model}",
        f"data={SMOKE_DATA}",
        "max_steps=40",
        "save_steps=8",
        "eval_steps=0",
        "val_size=0",
        "report_to=[none]",
        "lora_dropout=0.1",  # dropout draws random numbers: resume must restore the RNG too
    ]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, slow_tiny_model) -> Path:
    """The uninterrupted run, in this process (saves a launcher start-up)."""
    from corral.training.config import TrainConfig
    from corral.training.loop import train

    from corral.config import load_config

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    config = load_config(
        TrainConfig, SMOKE, [*resume_args(slow_tiny_model)[2:], f"output_dir={run_dir}"]
    )
    return train(config)


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        int(p.name.split("-")[1])
        for p in root.glob("checkpoint-*")
        if (p / "trainer_state.json").exists()
    )


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_matches_uninterrupted_run(
    tmp_path, slow_tiny_model, reference_run
):
    args = resume_args(slow_tiny_model)
    run_dir = tmp_path / "interrupted"

    # 1. SIGTERM to the whole process group, as a cluster scheduler sends it: a checkpoint of the
    #    current step is saved (not a multiple of save_steps) and the run stops.
    proc = _start([*args, f"output_dir={run_dir}"], tmp_path / "term-logs")
    _wait_for(
        # Whole lines only: a line being written is not parsed.
        lambda: (
            (run_dir / "metrics.jsonl").exists()
            and (run_dir / "metrics.jsonl").read_text().count("\n") >= 3
        ),
        120,
        proc,
        "three logged steps before SIGTERM",
    )
    os.killpg(proc.pid, signal.SIGTERM)
    _wait_group_gone(proc)
    assert "stopped by SIGTERM" in (tmp_path / "term-logs" / "stderr.txt").read_text()
    (term_step,) = checkpoint_steps(run_dir)
    assert 3 <= term_step < 40
    assert not (run_dir / "adapter_model.safetensors").exists()

    # 2. Resume, then SIGKILL (no chance to save) once a later checkpoint exists.
    proc = _start([*args, f"output_dir={run_dir}", "resume=auto"], tmp_path / "kill-logs")
    _wait_for(
        lambda: checkpoint_steps(run_dir)[-1] > term_step,
        120,
        proc,
        f"a checkpoint after step {term_step} before SIGKILL",
    )
    os.killpg(proc.pid, signal.SIGKILL)
    _wait_group_gone(proc)
    assert not (run_dir / "adapter_model.safetensors").exists(), "the run finished before the kill"
    assert (
        f"resumed from {run_dir}/checkpoints/checkpoint-{term_step}"
        in (tmp_path / "kill-logs" / "stdout.txt").read_text()
    )

    # 3. Resume again to the end: the same weights as the run that was never interrupted.
    resumed = launch(*args, f"output_dir={run_dir}", "resume=auto")
    assert "resumed from" in resumed.stdout
    expected = load_file(str(reference_run / "adapter_model.safetensors"))
    actual = load_file(str(run_dir / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    # metrics.jsonl holds each step once, whatever was logged before each interruption.
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == list(range(1, 41))


@pytest.mark.slow
def test_export_merges_adapter_into_plain_model(tmp_path, reference_run, slow_tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.cli import main
    from corral.models import load_model

    out = tmp_path / "merged"
    assert main(["export", str(reference_run), "--merge", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "run_info.json").read_text())["template"] == "alpaca"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = load_model(str(slow_tiny_model), dtype=torch.float32, tokenizer=tokenizer)
    base_logits = first_prompt_logits(base, tokenizer)
    adapted = PeftModel.from_pretrained(base, reference_run).eval()
    merged_logits = first_prompt_logits(merged, tokenizer)
    torch.testing.assert_close(
        merged_logits, first_prompt_logits(adapted, tokenizer), rtol=1e-4, atol=1e-4
    )
    assert (merged_logits - base_logits).abs().max() > 1e-4  # the merge did change the model
    assert main(["export", str(reference_run), "--merge", str(out)]) == 2  # never overwrites


def test_bad_data_stops_before_training(tmp_path, capsys):
    from corral.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", "input": ""}\n'
    )
    run_dir = tmp_path / "never"
    status = main(
        [
            "train",
            "--config",
            str(SMOKE),
            f"data={bad}",
            f"output_dir={run_dir}",
            "model=tiny-random",
        ]
    )
    assert status == 2
    error = capsys.readouterr().err
    assert "bad.jsonl: line 2: field 'output': missing required field" in error
    assert not run_dir.exists()
    assert main(["train", "--config", str(SMOKE), "no_such_key=1"]) == 2
    assert "unknown key 'no_such_key'" in capsys.readouterr().err


def test_too_long_data_stops_before_training(tmp_path, capsys):
    from corral.cli import main

    run_dir = tmp_path / "never"
    status = main(
        [
            "train",
            "--config",
            str(SMOKE),
            f"data={SMOKE_DATA}",
            "max_length=16",
            f"output_dir={run_dir}",
            "model=tiny-random",
        ]
    )
    assert status == 2
    error = capsys.readouterr().err
    assert (
        "smoke_alpaca.json: record 0: field 'output': every example is longer than max_length=16"
        in error
    )
    assert not run_dir.exists()


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, tiny_model_path):
    from corral.training.config import TrainConfig
    from corral.training.loop import NonFiniteLossError, train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.config import load_config

    # A base whose weights hold a NaN (a corrupted download or conversion) makes the loss NaN.
    broken = tmp_path / "broken-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(broken)
    config = load_config(
        TrainConfig,
        SMOKE,
        [
            f"model={broken}",
            f"data={SMOKE_DATA}",
            f"output_dir={tmp_path / 'nan'}",
            "max_steps=3",
            "val_size=0",
            "report_to=[none]",
        ],
    )
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 1"):
        train(config)
    assert not (tmp_path / "nan" / "adapter_model.safetensors").exists()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split())


def test_auto_precision_is_bf16_on_cpus_with_native_bf16():
    import torch
    from corral.training.config import TrainConfig
    from corral.training.model import compute_dtype

    native = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    assert compute_dtype(TrainConfig(precision="fp32")) == torch.float32
    if not torch.cuda.is_available():
        expected = torch.bfloat16 if native else torch.float32
        assert compute_dtype(TrainConfig(precision="auto")) == expected


@pytest.mark.slow
@pytest.mark.skipif(
    not ({"avx512_bf16", "amx_bf16"} & _cpu_flags()), reason="this CPU has no native bf16"
)
def test_auto_precision_trains_in_bf16_on_a_native_bf16_cpu(tmp_path):
    """`precision=auto` on such a CPU: bf16 mixed precision, said at start and in the summary, and
    the eval loss still falls. (That its eval loss matches fp32's within 1% is measured by
    benchmarks/train_throughput.py --roles corral corral_bf16, both adapters scored in fp32.)"""
    run_dir = tmp_path / "auto"
    result = launch(
        "--config", str(SMOKE), f"output_dir={run_dir}", "precision=auto",
        "max_steps=4", "eval_steps=4", "save_steps=4",
    )  # fmt: skip
    assert "precision: bf16 (precision=auto)" in result.stdout
    assert json.loads((run_dir / "train_summary.json").read_text())["precision"] == "bf16"
    losses = eval_losses(run_dir)
    assert losses[-1] < losses[0], losses

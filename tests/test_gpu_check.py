"""scripts/gpu_check.sh: on a machine without a GPU it prints its plan and exits 0; the plan's
commands are valid; the memory arithmetic reproduces the 7B table of docs/training.md; the worker that
records peak memory and tokens runs train.py unchanged."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from corral.training.config import TrainConfig

from corral.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
HAS_NVIDIA_DRIVER = shutil.which("nvidia-smi") is not None or Path("/dev/nvidiactl").exists()


def _load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


gpu_check = _load_module()


def run_check(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def plan_of(*args: str) -> dict:
    result = run_check("--dry-run", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def train_commands(report: dict) -> list[list[str]]:
    return [
        command["argv"]
        for step in report["plan"]
        for command in step["commands"]
        if "train.py" in command["argv"]
    ]


@pytest.mark.skipif(HAS_NVIDIA_DRIVER, reason="this machine may have a GPU: the check would run")
def test_without_a_gpu_it_prints_the_plan_as_json_and_exits_0(tmp_path):
    result = run_check(cwd=tmp_path)  # from anywhere, not only the repository
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["gpu"] is None
    assert report["reason"] == "no CUDA device"
    assert report["dry_run"] is True and report["ok"] is True
    assert report["plan_problems"] == []
    assert [step["step"] for step in report["plan"]] == ["probe", "lora", "qlora", "fsdp", "serve"]
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_dry_run_training_commands_load_with_the_config_loader():
    report = plan_of()
    commands = train_commands(report)
    assert len(commands) == 4  # lora, qlora, and the two FSDP launches
    methods = []
    for argv in commands:
        assert argv[1:3] == ["launch", "--config_file"]
        assert (REPO / argv[3]).is_file()
        at = argv.index("train.py")
        assert argv[at + 1] == "--config"
        config = load_config(TrainConfig, REPO / argv[at + 2], argv[at + 3 :])
        assert config.model == "embedded"
        assert config.truncation == "truncate"
        assert config.output_dir.startswith("runs/gpu_check/")
        methods.append((config.method, config.resume, argv[3]))
    assert methods == [
        ("lora", "", "configs/accelerate/single_device.yaml"),
        ("qlora", "", "configs/accelerate/single_device.yaml"),
        ("full", "", "configs/accelerate/fsdp.yaml"),
        ("full", "auto", "configs/accelerate/fsdp.yaml"),
    ]
    lora = report["plan"][1]
    assert lora["as_a_user_types_it"][0].startswith(
        "accelerate launch --config_file configs/accelerate/single_device.yaml train.py --config "
        "configs/training/alpaca_lora_7b.yaml model=embedded"
    )
    assert "precision=bf16" in lora["as_a_user_types_it"][0]
    assert "checkpoint-6" in report["plan"][3]["between_commands"]


def test_the_dry_run_gives_the_arithmetic_for_the_chosen_model():
    small = plan_of()
    assert small["model"]["parameters"] == 134_515_008  # SmolLM2-135M, from its config.json
    lora = small["plan"][1]["expectations"]
    assert lora["memory_per_gpu"]["total_gb"] < 5
    assert lora["flops"]["formula"] == "4*N_mm + 6*N_adapter + 12*L*d*l"
    assert "note" in lora["tokens_per_s_if_mfu_equals_anchor"]

    big = plan_of("--model", "meta-llama/Llama-2-7b-hf", "--gpus", "8")
    assert big["model"]["is_llama_7b"] and big["time_limit_s"] > 600
    totals = {
        step["step"]: step["expectations"]["memory_per_gpu"]["total_gb"]
        for step in big["plan"]
        if step["step"] in ("lora", "qlora", "fsdp")
    }
    assert 19 <= totals["lora"] <= 21 and 9 <= totals["qlora"] <= 10 and 25 <= totals["fsdp"] <= 27
    assert "~26 GB" in big["plan"][3]["expectations"]["readme_7b_table"]
    # At the anchor's 20.7% MFU, a 7B LoRA on an A100 would run at ~1.6K tokens/s (6N convention).
    at = big["plan"][1]["expectations"]["tokens_per_s_if_mfu_equals_anchor"]["hf_lora_a100"]
    assert 1500 < at["six_n_convention"] < 1700
    # Decoding 13.5 GB of bf16 weights from 2,039 GB/s: at most ~151 steps/s.
    serve = big["plan"][4]["expectations"]
    assert 150 <= serve["decode_steps_per_s_upper_bound"] <= 152


def test_the_memory_arithmetic_reproduces_the_readmes_7b_table():
    arch = gpu_check.Architecture.from_config(gpu_check.LLAMA_7B_CONFIG)
    assert round(arch.parameters / 1e9, 2) == 6.74
    assert round(arch.quantized_params / 1e9, 2) == 6.48
    assert round(arch.unquantized_params / 1e6) == 262
    memory = gpu_check.memory_arithmetic

    full = memory(
        arch, method="full", micro_batch_size=4, max_length=512, gradient_checkpointing=False,
        world=8,
    )  # fmt: skip
    parts = full["components_gb"]
    assert round(arch.parameters * 16 / 1e9) == 108
    assert round(parts["weights_grads_adam_fp32"], 1) == 13.5
    assert round(parts["gathered_layers_bf16"], 1) == 0.8
    assert round(parts["activations"], 1) == 9.1
    assert 25 <= full["total_gb"] <= 27  # README: ~26 GB

    lora_args = {"method": "lora", "micro_batch_size": 4, "max_length": 256, "lora_r": 8}
    lora = memory(
        arch, gradient_checkpointing=False, lora_targets=["q_proj", "v_proj"], **lora_args
    )
    parts = lora["components_gb"]
    assert round(lora["lora_parameters"] / 1e6, 1) == 4.2
    assert round(parts["base_weights_bf16"], 1) == 13.5
    assert round(parts["lora_weights_grads_adam"], 2) == 0.07
    assert round(parts["activations"], 1) == 4.6
    assert 19 <= lora["total_gb"] <= 21  # README: ~20 GB
    checkpointed = memory(
        arch, gradient_checkpointing=True, lora_targets=["q_proj", "v_proj"], **lora_args
    )
    assert round(checkpointed["components_gb"]["activations_checkpointed"], 1) == 0.3
    assert 15 <= checkpointed["total_gb"] <= 16  # README: ~15.5 GB

    qlora = memory(
        arch, method="qlora", micro_batch_size=4, max_length=512, gradient_checkpointing=True,
        lora_r=64, lora_targets=["all-linear"],
    )  # fmt: skip
    parts = qlora["components_gb"]
    assert round(parts["nf4_weights"], 2) == 3.24
    assert round(parts["double_quant_constants"], 1) == 0.1
    assert round(parts["embeddings_lm_head_norms_fp32"], 2) == 1.05
    assert round(qlora["lora_parameters"] / 1e6) == 160
    assert round(parts["lora_weights_grads_adam"], 2) == 2.56
    assert 9 <= qlora["total_gb"] <= 10  # README: ~9-10 GB


def test_lora_flops_leave_out_the_frozen_weights_gradients():
    arch = gpu_check.Architecture.from_config(gpu_check.LLAMA_7B_CONFIG)
    full = gpu_check.flops_per_token(arch, method="full", adapter_params=0, context=512)
    lora = gpu_check.flops_per_token(arch, method="lora", adapter_params=4_194_304, context=512)
    assert (
        full["flops_per_token"] - lora["flops_per_token"] == 2 * arch.matmul_params - 6 * 4_194_304
    )
    attention = 12 * 32 * 4096 * 512
    assert full["flops_per_token"] == 6 * arch.matmul_params + attention


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA A100-SXM4-80GB", ("A100 SXM 80GB", 312.0)),
        ("NVIDIA A100-PCIE-40GB", ("A100 40GB", 312.0)),
        ("NVIDIA H100 80GB HBM3", ("H100 SXM", 989.0)),
        ("NVIDIA H100 PCIe", ("H100 PCIe", 756.0)),
        ("NVIDIA A10G", ("A10G", 125.0)),
        ("NVIDIA L4", ("L4", 121.0)),
        ("NVIDIA GeForce RTX 4090", ("RTX 4090", 165.0)),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_come_from_the_card_name(name, expected):
    specs = gpu_check.gpu_specs(name)
    assert (specs and (specs["table_name"], specs["bf16_tflops"])) == (expected or None)


@pytest.mark.parametrize(
    ("model", "message"),
    [("./no-such-model-folder", "no such model folder"), ("EMPTY", "no config.json")],
)
def test_a_model_that_is_not_there_is_one_line_and_exit_2(model, message, tmp_path):
    if model == "EMPTY":
        model = str(tmp_path)
    result = run_check("--model", model)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().startswith("gpu_check: error: ")
    assert message in result.stderr and "Traceback" not in result.stderr


def test_progress_bars_are_left_out_of_a_failing_steps_stderr():
    noisy = (
        "loading\ntrain:  50%|#####     | 1/2 [00:01<00:01]\rtrain: 100%|###| 2/2\nValueError: x\n"
    )
    assert gpu_check.tail(noisy) == "loading\nValueError: x"


@pytest.mark.slow
def test_the_worker_runs_train_py_and_records_every_step(tmp_path):
    """The launch the check makes on a GPU, here on the CPU with the tiny model."""
    data = tmp_path / "data.json"
    gpu_check.write_data(data, records=32, words=200)
    records = tmp_path / "ranks"
    argv = gpu_check.launch_argv(
        "configs/accelerate/single_device.yaml",
        records,
        "configs/training/alpaca_lora_7b.yaml",
        [
            *gpu_check.common_overrides("tiny-random", data, tmp_path / "run"),
            "max_steps=3",
            "max_length=64",
            "val_size=0",
        ],
    )
    result = subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = gpu_check.read_records(records)
    assert record["exit_code"] == 0
    assert record["setup"]["optimizer"] == "AdamW" and record["setup"]["start_step"] == 0
    assert [s["step"] for s in record["steps"]] == [1, 2, 3]
    for step in record["steps"]:
        # micro-batch 4 of examples cut to exactly max_length tokens
        assert step["tokens"] == step["local_tokens"] == 4 * 64
        assert step["local_sum_sq_lengths"] == 4 * 64 * 64
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()

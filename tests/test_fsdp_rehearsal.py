"""FSDP2 on CPUs over gloo: the sharding a GPU cluster run depends on, rehearsed for real.

Two processes launched by torchrun on 127.0.0.1 train LoRA on the tiny random LLaMA with each
decoder layer and the root as FSDP units (corral.training.fsdp_rehearsal), checkpoint at step 2, and
consolidate the adapter; two new processes resume from the checkpoint; one process replays the same
global batches unsharded. The sharding decisions are checked against accelerate's own policy, read
from the same configs/accelerate/*.yaml a GPU run launches with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from servers import free_port

from corral.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
REHEARSAL = "corral.training.fsdp_rehearsal"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
FSDP_CONFIGS = [REPO / "configs/accelerate/fsdp.yaml", REPO / "configs/accelerate/two_nodes.yaml"]


def rehearse(*args: str, processes: int) -> dict:
    """Run the rehearsal (sharded over `processes` ranks, or in one process when 0) and return
    rank 0's JSON summary."""
    if processes:
        launcher = [
            TORCHRUN, f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]  # fmt: skip
    else:
        launcher = [sys.executable]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launcher, "-m", REHEARSAL, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, tiny_model_path) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("fsdp")
    common = ["--steps", "4", "--learning-rate", "0.01"]
    first = rehearse("--out", str(root / "first"), "--save-at", "2", *common, processes=2)
    resumed = rehearse(
        "--out", str(root / "resumed"), "--resume", first["checkpoints"][0], *common, processes=2
    )
    one = rehearse("--out", str(root / "one"), "--one-process", "2", *common, processes=0)
    return SimpleNamespace(first=first, resumed=resumed, one=one, root=root)


def probe(summary: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(summary["probe"])


# ------------------------------------------------------------------------------ the policy


@pytest.mark.parametrize("config", FSDP_CONFIGS, ids=lambda p: p.name)
def test_the_units_are_the_ones_accelerate_chooses_from_the_same_config(config, tiny_model_path):
    """One decision for both paths: the modules `wrapping_units` shards are exactly those
    accelerate's FSDP2 policy picks from the config a GPU run launches with."""
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from corral.training.config import TrainConfig
    from corral.training.model import build_model
    from corral.training.sharding import read_fsdp_settings, wrapping_units

    from corral.models import load_tokenizer

    settings = read_fsdp_settings(config)
    assert settings.layer_class_names == ("LlamaDecoderLayer",)
    assert settings.state_dict_type == "SHARDED_STATE_DICT"
    model = build_model(
        TrainConfig(model="tiny-random", precision="fp32"),
        load_tokenizer("tiny-random"),
        local_process_index=0,
    )
    fsdp = yaml.safe_load(config.read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=fsdp["fsdp_transformer_layer_cls_to_wrap"],
    )
    plugin.set_auto_wrap_policy(model)
    accelerate_picks = fsdp2_prepare_auto_wrap_policy(plugin, model)
    theirs = [name for name, module in model.named_modules() if accelerate_picks(module)]
    units = wrapping_units(model, settings.layer_class_names)
    ours = [name for name, module in model.named_modules() if any(module is u for u in units[:-1])]
    assert ours == theirs == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    assert units[-1] is model
    # Each layer's unit holds its frozen base weights and its trainable LoRA weights together.
    layer = units[0]
    kinds = {parameter.requires_grad for parameter in layer.parameters()}
    assert kinds == {True, False}
    # Without a class name, the model's own `_no_split_modules`, as accelerate defaults.
    assert wrapping_units(model)[:-1] == units[:-1]
    with pytest.raises(ConfigError, match="LlamaLayer is not a module class of this model"):
        wrapping_units(model, ("LlamaLayer",))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fsdp_version": 1}, "fsdp_config.fsdp_version': expected 2"),
        ({"fsdp_auto_wrap_policy": "SIZE_BASED_WRAP"}, "fsdp_auto_wrap_policy': expected"),
    ],
)
def test_a_config_the_rehearsal_cannot_repeat_is_named(change, message, tmp_path):
    import yaml
    from corral.training.sharding import read_fsdp_settings

    document = yaml.safe_load(FSDP_CONFIGS[0].read_text())
    document["fsdp_config"].update(change)
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match=message) as error:
        read_fsdp_settings(path)
    assert str(path) in str(error.value)
    with pytest.raises(ConfigError, match="distributed_type': expected FSDP"):
        read_fsdp_settings(REPO / "configs/accelerate/ddp.yaml")


# ------------------------------------------------------------------------------ two processes


@pytest.mark.long
def test_each_rank_holds_half_of_the_model_as_dtensor_shards(rehearsal):
    first = rehearsal.first
    assert first["world_size"] == 2
    assert first["wrapping_units"] == [
        "base_model.model.model.layers.0",
        "base_model.model.model.layers.1",
        "(root)",
    ]
    # sharding_report raises unless every parameter is a DTensor; each rank holds its half.
    for kind in ("trainable", "frozen"):
        held = [rank[f"held_{kind}"] for rank in first["per_rank"]]
        whole = first["per_rank"][0][f"total_{kind}"]
        assert sum(held) == whole
        assert all(0.4 * whole <= h <= 0.6 * whole for h in held), (kind, held, whole)
    assert first["per_rank"][0]["total_trainable"] == first["trainable_parameters"] == 3584


@pytest.mark.long
def test_frozen_weights_stay_frozen_and_only_lora_trains(rehearsal):
    first = rehearsal.first
    assert first["requires_grad_kept"]  # the same trainable names before and after sharding
    assert first["grads_only_on_trainable"]  # every LoRA weight has a gradient, no frozen one
    assert first["optimizer_holds_trainable_only"]
    assert first["trainable_parameters"] == rehearsal.one["trainable_parameters"]


@pytest.mark.long
def test_two_sharded_processes_give_the_losses_of_one_process(rehearsal):
    sharded, one = rehearsal.first["losses"], rehearsal.one["losses"]
    assert [s["step"] for s in sharded] == [s["step"] for s in one] == [1, 2, 3, 4]
    for a, b in zip(sharded, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # The run learned something (the comparison is not of four equal numbers).
    assert sharded[-1]["loss"] < sharded[0]["loss"] - 0.01
    import torch

    torch.testing.assert_close(
        probe(rehearsal.first)["logits"], probe(rehearsal.one)["logits"], atol=1e-4, rtol=1e-4
    )


@pytest.mark.long
def test_resuming_from_the_sharded_checkpoint_repeats_the_run_exactly(rehearsal):
    import torch

    first, resumed = rehearsal.first, rehearsal.resumed
    checkpoint = Path(first["checkpoints"][0])
    assert checkpoint.name == "checkpoint-2"
    # Each rank wrote its own shard; the frozen base (3.2M weights) is not in it.
    shards = sorted(p.name for p in checkpoint.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    assert sum(p.stat().st_size for p in checkpoint.iterdir()) < 1_000_000
    assert resumed["losses"] == first["losses"][2:]  # steps 3 and 4, to the last bit
    assert torch.equal(probe(resumed)["logits"], probe(first)["logits"])


@pytest.mark.long
def test_the_consolidated_adapter_loads_in_peft_and_answers_as_the_sharded_model(rehearsal):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from corral.models import load_model, load_tokenizer

    adapter = Path(rehearsal.first["adapter"])
    expected = probe(rehearsal.first)
    tokenizer = load_tokenizer("tiny-random")
    base = load_model("tiny-random", dtype=torch.float32, tokenizer=tokenizer).eval()
    with torch.no_grad():
        base_logits = base(input_ids=expected["input_ids"]).logits
        tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
        logits = tuned(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter does change the answer
    # The same tensors as the one-process run's adapter, saved by peft itself.
    gathered = load_file(str(adapter / "adapter_model.safetensors"))
    unsharded = load_file(str(Path(rehearsal.one["adapter"]) / "adapter_model.safetensors"))
    assert gathered.keys() == unsharded.keys() and len(gathered) == 8
    for name in gathered:
        torch.testing.assert_close(gathered[name], unsharded[name], atol=1e-4, rtol=1e-4)


@pytest.mark.long
def test_export_and_serving_take_the_consolidated_adapter(rehearsal, tmp_path):
    import torch
    from corral.inference.loading import load_for_inference
    from corral.training.export import merge_run

    from corral.rundir import read_run_info

    adapter = Path(rehearsal.first["adapter"])
    info = read_run_info(adapter)
    assert (info.kind, info.method, info.template, info.base_model) == (
        "adapter",
        "lora",
        "alpaca",
        "tiny-random",
    )
    expected = probe(rehearsal.first)
    merged = merge_run(adapter, tmp_path / "merged")
    for folder in (adapter, merged):
        loaded = load_for_inference(run=folder, dtype=torch.float32, device="cpu")
        assert loaded.template.name == "alpaca"
        with torch.no_grad():
            logits = loaded.model(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ one rank, here


@pytest.fixture
def one_rank_mesh():
    """A process group of this test process alone: sharding functions run without a launcher."""
    import torch.distributed as dist
    from corral.training.sharding import join_cpu_process_group

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield join_cpu_process_group()
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_of_another_lora_config_is_refused_in_one_line(
    one_rank_mesh, tmp_path, tiny_model_path
):
    from corral.training.config import TrainConfig
    from corral.training.model import build_model, build_optimizer, build_scheduler
    from corral.training.sharding import (
        consolidate_adapter,
        load_sharded_checkpoint,
        save_sharded_checkpoint,
        shard_model_fsdp2,
    )

    from corral.errors import RunDirError, UsageError
    from corral.models import load_tokenizer
    from corral.templates import get_template

    tokenizer = load_tokenizer("tiny-random")

    def sharded(rank: int) -> tuple:
        config = TrainConfig(model="tiny-random", precision="fp32", lora_r=rank, lora_dropout=0.0)
        model = build_model(config, tokenizer, local_process_index=0)
        shard_model_fsdp2(model, mesh=one_rank_mesh)
        optimizer = build_optimizer(config, model)
        return model, optimizer, build_scheduler(config, optimizer, 4)

    model, optimizer, scheduler = sharded(8)
    written = save_sharded_checkpoint(model, optimizer, scheduler, tmp_path, {"step": 1})
    assert load_sharded_checkpoint(model, optimizer, scheduler, written) == {"step": 1}
    with pytest.raises(RunDirError, match=r"checkpoint-1: does not match .*lora_A.* has shape"):
        load_sharded_checkpoint(*sharded(4), written)
    with pytest.raises(RunDirError, match="not a complete checkpoint folder"):
        load_sharded_checkpoint(model, optimizer, scheduler, tmp_path)
    with pytest.raises(UsageError, match="exists and is not an empty folder"):
        consolidate_adapter(
            model,
            tmp_path,
            tokenizer=tokenizer,
            template=get_template("alpaca", tokenizer),
            base_model="tiny-random",
            max_length=64,
        )

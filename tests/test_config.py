"""Dataclass configs: YAML presets, key=value overrides, and errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from corral.config import ConfigError, config_help, load_config, parse_override, save_config


@dataclass
class ExampleConfig:
    model: str = field(default="embedded", metadata={"help": "base model"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    epochs: int = field(default=3, metadata={"help": "passes over the data"})
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "LoRA targets"}
    )
    schedule: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "lr schedule"}
    )
    packing: bool = field(default=False, metadata={"help": "pack examples"})
    limit: int | None = field(default=None, metadata={"help": "optional cap"})


def test_yaml_then_overrides(tmp_path):
    preset = tmp_path / "x.yaml"
    preset.write_text("# corral train --config x.yaml\nlr: 2.0e-5\nepochs: 1\ntargets: [q_proj]\n")
    config = load_config(
        ExampleConfig,
        preset,
        ["epochs=5", "schedule=linear", "packing=true", "targets=q_proj,k_proj", "limit=10"],
    )
    assert (config.lr, config.epochs, config.schedule, config.packing) == (2e-5, 5, "linear", True)
    assert config.targets == ["q_proj", "k_proj"]
    assert config.limit == 10


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(ExampleConfig, None, ["lr=1e-3", "limit=null"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(ExampleConfig, tmp_path / "resolved.yaml") == config
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["lr"] == 1e-3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["epoch=3"], r"override 'epoch=3': unknown key 'epoch' \(did you mean epochs\?\)"),
        (["epochs=many"], r"key 'epochs': expected an integer"),
        (["schedule=warm"], r"key 'schedule': 'warm' is not one of"),
        (["packing=maybe"], r"key 'packing': expected true or false"),
        (["lr"], r"expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ExampleConfig, None, overrides)


def test_bad_yaml_names_the_file(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_config(ExampleConfig, preset)
    preset.write_text("learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'learning_rate'"):
        load_config(ExampleConfig, preset)


def test_override_parsing_and_help():
    assert parse_override("--lr=2e-4") == ("lr", 2e-4)
    assert parse_override("name=a=b") == ("name", "a=b")
    assert "lr=0.0003: peak learning rate" in config_help(ExampleConfig)


def test_a_bad_override_is_named_as_typed_not_the_preset():
    from corral.training.config import TrainConfig

    preset = "configs/training/smoke.yaml"
    with pytest.raises(ConfigError) as error:
        load_config(TrainConfig, preset, ["learning_rate=-1"])
    assert str(error.value).startswith("override 'learning_rate=-1': key 'learning_rate'")
    assert "smoke.yaml" not in str(error.value)


def test_an_estimate_is_bounded_and_prices_are_never_negative(tmp_path, capsys):
    from corral.cli import main as corral_main

    # A teacher nobody answers at: refused before it is even reached.
    output = ["--output", str(tmp_path / "d.json"), "--base-url", "http://127.0.0.1:9/v1"]
    assert corral_main(["generate", *output, "--estimate", "--estimate-probes", "1000000"]) == 2
    assert "--estimate-probes must be within 1..100, got 1000000" in capsys.readouterr().err
    assert corral_main(["generate", *output, "price_per_1k_prompt_tokens=-0.5"]) == 2
    err = capsys.readouterr().err
    assert "override 'price_per_1k_prompt_tokens=-0.5': price_per_1k_prompt_tokens must be 0" in err
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "Say hi.", "output": "hi"}]')
    argv = ["score", str(data), "--output", str(tmp_path / "s.json"), "--judge", "embedded",
            "--price-completion", "-1"]  # fmt: skip
    assert corral_main(argv) == 2
    assert "--price-completion must be 0 or more, got -1.0" in capsys.readouterr().err
    assert not list(tmp_path.glob("d.*")) and not (tmp_path / "s.json").exists()

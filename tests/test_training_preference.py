"""Preference training (training/preference.py): the pairs' data and masks, the DPO loss against its
formula, the reference policy, DPO and reward-model smoke runs on the embedded model, and exact
resume of a DPO run after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from corral.training.config import TrainConfig
from corral.training.data import IGNORE_INDEX
from safetensors.torch import load_file
from servers import wait_until

from corral.config import load_config
from corral.errors import ConfigError, RecordError

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
DPO_SMOKE = REPO / "configs" / "training" / "dpo_smoke.yaml"
REWARD_SMOKE = REPO / "configs" / "training" / "reward_smoke.yaml"
PAIRS = REPO / "configs" / "training" / "smoke_preferences.jsonl"
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}


def launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [ACCELERATE, "launch", "train.py", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def dpo_config(*overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig,
        DPO_SMOKE,
        ["model=tiny-random", f"data={PAIRS}", "report_to=[none]", *overrides],
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from corral.models import load_tokenizer

    return load_tokenizer("tiny-random")


def some_pairs(tokenizer, template, count: int = 3):
    from corral.training.preference import read_preferences, tokenize_pairs

    records = read_preferences(PAIRS)[:count]
    pairs, _ = tokenize_pairs(records, tokenizer, template, max_length=256)
    return records, pairs


# ------------------------------------------------------------------------------ data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
            "bad.jsonl: line 2: field 'rejected': missing required field",
        ),
        (
            '{"prompt": "a", "chosen": 3, "rejected": "c"}\n',
            "bad.jsonl: line 1: field 'chosen': expected a string, got int",
        ),
        (
            '{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}\n',
            "bad.jsonl: line 1: field 'prompt': expected a string, got list (conversational",
        ),
        (
            '{"prompt": " ", "chosen": "b", "rejected": "c"}\n',
            "bad.jsonl: line 1: field 'prompt': prompt is empty",
        ),
        (
            '{"prompt": "a", "chosen": "b", "rejected": "b"}\n',
            "bad.jsonl: line 1: field 'rejected': identical to 'chosen'",
        ),
        ("{not json\n", "bad.jsonl: line 1: invalid JSON"),
    ],
)
def test_bad_preference_files_name_file_record_and_field(tmp_path, content, message):
    from corral.training.preference import read_preferences

    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(RecordError) as error:
        read_preferences(bad)
    assert message in str(error.value)


def test_a_json_list_names_the_record_index_and_extra_keys_are_kept(tmp_path):
    from corral.training.preference import read_preferences

    good = {"prompt": "a", "chosen": "b", "rejected": "c", "source": "mine"}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([good, {**good, "chosen": None}]))
    with pytest.raises(RecordError, match=r"pairs.json: record 1: field 'chosen': expected a str"):
        read_preferences(path)
    path.write_text(json.dumps([good]))
    assert read_preferences(path) == [{**good, "input": ""}]


def test_bad_pairs_stop_train_py_in_one_line_before_a_model_loads(tmp_path, capsys):
    from corral.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n')
    run_dir = tmp_path / "never"
    args = ["train", "--config", str(DPO_SMOKE), f"data={bad}", f"output_dir={run_dir}"]
    assert main([*args, "model=tiny-random"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0, error
    assert error.endswith("bad.jsonl: line 2: field 'chosen': missing required field")
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=reward", "packing=true"], "key 'packing'"),
        (["method=lora", "init_adapter=runs/x"], "key 'init_adapter'.*method=dpo"),
        (["beta=0"], "key 'beta'"),
        (["train_on_inputs=true"], "key 'train_on_inputs'"),
        (["loss_type=hinge"], "key 'loss_type'"),
    ],
)
def test_bad_preference_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        dpo_config(*overrides)


@pytest.mark.slow  # names the embedded model, which resolving prepares
def test_init_adapter_must_match_the_base_and_template(lora_run):
    from corral.training.model import check_init_adapter

    check_init_adapter(dpo_config(f"init_adapter={lora_run}", "template=dolly"))
    with pytest.raises(ConfigError, match="trained with template 'dolly'.*set template=dolly"):
        check_init_adapter(dpo_config(f"init_adapter={lora_run}"))
    with pytest.raises(ConfigError, match="was trained on tiny-random, but model is embedded"):
        check_init_adapter(
            dpo_config(f"init_adapter={lora_run}", "template=dolly", "model=embedded")
        )


@pytest.mark.parametrize("template_name", ["alpaca", "dolly"])
def test_only_the_answers_and_their_end_marker_are_trained(tokenizer, template_name):
    from corral.training.preference import collate_pairs

    from corral.templates import get_template

    template = get_template(template_name, tokenizer)
    records, pairs = some_pairs(tokenizer, template)
    for record, pair in zip(records, pairs, strict=True):
        prompt_ids = tokenizer(template.format_prompt(record["prompt"]))["input_ids"]
        for key, example in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            # The same prompt ids for both answers, never trained.
            assert example.input_ids[: len(prompt_ids)] == prompt_ids
            assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
            trained = example.labels[len(prompt_ids) :]
            assert IGNORE_INDEX not in trained
            assert tokenizer.decode(trained) == record[key] + template.completion_suffix
            assert tokenizer.decode(trained).endswith(template.end_marker)
    # In the batch: chosen rows then rejected rows; the targets are exactly those answer tokens.
    batch = collate_pairs(pairs, packing=False, pad_token_id=tokenizer.pad_token_id)
    assert batch["num_pairs"] == len(pairs)
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    for row, example in enumerate(examples):
        targets = batch["targets"][row]
        expected = [label for label in example.labels[1:] if label != IGNORE_INDEX]
        assert targets[targets != IGNORE_INDEX].tolist() == expected
        assert set(batch["example_ids"][row][targets != IGNORE_INDEX].tolist()) == {row}


# ------------------------------------------------------------------------------ the DPO loss


def plain_logps(model, tokenizer, template, record: dict, key: str) -> tuple[torch.Tensor, int]:
    """Summed log-probability of an answer (and its end marker) from a plain full-logits forward."""
    prompt_ids = tokenizer(template.format_prompt(record["prompt"]))["input_ids"]
    answer_ids = tokenizer(template.format_completion(record[key]), add_special_tokens=False)[
        "input_ids"
    ]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return logps[positions, ids[0, positions + 1]].sum(), len(answer_ids)


@pytest.fixture(scope="module")
def perturbed_policy(tokenizer):
    """A DPO model on tiny-random whose adapter is not zero, so policy and reference differ."""
    from corral.training.model import build_model

    torch.manual_seed(0)
    model = build_model(dpo_config("lora_dropout=0"), tokenizer, local_process_index=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    return model


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_matches_the_formula(tokenizer, perturbed_policy, loss_type, packing):
    from corral.training.preference import collate_pairs, dpo_loss_sum

    from corral.models import load_model
    from corral.templates import get_template

    beta = 0.1
    template = get_template("alpaca", tokenizer)
    records, pairs = some_pairs(tokenizer, template, count=4)
    batch = collate_pairs(
        pairs, packing=packing, pad_token_id=tokenizer.pad_token_id, row_capacity=128
    )
    loss_sum, stats = dpo_loss_sum(
        perturbed_policy, batch, "cpu", peft_model=perturbed_policy, beta=beta, loss_type=loss_type
    )

    # Independently: the policy and a freshly loaded base, each sequence alone, all logits.
    reference = load_model("tiny-random", dtype=torch.float32, tokenizer=tokenizer).eval()
    expected, margins, accuracies = 0.0, 0.0, 0
    for record in records:
        pc, nc = plain_logps(perturbed_policy, tokenizer, template, record, "chosen")
        pr, nr = plain_logps(perturbed_policy, tokenizer, template, record, "rejected")
        rc, _ = plain_logps(reference, tokenizer, template, record, "chosen")
        rr, _ = plain_logps(reference, tokenizer, template, record, "rejected")
        if loss_type == "sigmoid":
            margin = beta * ((pc - rc) - (pr - rr))
            expected += -math.log(1 / (1 + math.exp(-float(margin))))
        else:
            margin = (pc - rc) / nc - (pr - rr) / nr
            expected += float((margin - 1 / (2 * beta)) ** 2)
        margins += float(beta * ((pc - rc) - (pr - rr)))
        accuracies += int(pc - rc > pr - rr)
    assert abs(margins) > 0.1  # the adapter moved the policy: not the trivial loss at the reference
    assert float(loss_sum.detach()) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert stats["rewards/margins"] == pytest.approx(margins, rel=1e-3, abs=1e-4)
    assert stats["rewards/accuracies"] == accuracies


def test_the_reference_is_the_base_and_stays_fixed_while_the_policy_trains(tokenizer):
    from corral.training.model import build_model
    from corral.training.preference import (
        collate_pairs,
        dpo_loss_sum,
        reference_policy,
        sequence_logps,
    )

    from corral.models import load_model
    from corral.templates import get_template

    template = get_template("alpaca", tokenizer)
    records, pairs = some_pairs(tokenizer, template, count=4)
    batch = collate_pairs(pairs, packing=False, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = build_model(dpo_config("lora_dropout=0.1"), tokenizer, local_process_index=0)
    model.train()

    def reference_logps():
        with torch.no_grad(), reference_policy(model, model):
            return sequence_logps(model, batch, "cpu")[0]

    base = load_model("tiny-random", dtype=torch.float32, tokenizer=tokenizer).eval()
    plain = [
        plain_logps(base, tokenizer, template, r, k)[0]
        for k in ("chosen", "rejected")
        for r in records
    ]
    before = reference_logps()
    torch.testing.assert_close(before, torch.stack(plain), rtol=1e-5, atol=1e-4)
    assert model.training  # the reference forward ran in eval mode and restored training mode

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss_sum, _ = dpo_loss_sum(
            model, batch, "cpu", peft_model=model, beta=0.1, loss_type="sigmoid"
        )
        loss_sum.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.testing.assert_close(reference_logps(), before, rtol=0, atol=0)  # bit for bit
    model.eval()
    with torch.no_grad():
        policy = sequence_logps(model, batch, "cpu")[0]
    assert (policy - before).abs().max() > 1e-2  # the policy moved away from it


def test_after_init_adapter_the_reference_is_base_plus_the_frozen_sft_adapter(tokenizer, lora_run):
    from corral.training.checkpoint import trainable_state_dict
    from corral.training.model import REFERENCE_ADAPTER, build_model
    from corral.training.preference import (
        collate_pairs,
        dpo_loss_sum,
        reference_policy,
        sequence_logps,
    )
    from peft import PeftModel

    from corral.models import load_model
    from corral.templates import get_template

    template = get_template("dolly", tokenizer)
    _, pairs = some_pairs(tokenizer, template, count=4)
    batch = collate_pairs(pairs, packing=True, pad_token_id=tokenizer.pad_token_id)
    config = dpo_config(f"init_adapter={lora_run}", "template=dolly")
    model = build_model(config, tokenizer, local_process_index=0)
    assert set(model.peft_config) == {"default", REFERENCE_ADAPTER}
    assert model.active_adapter == "default"
    trained = trainable_state_dict(model)
    assert trained and not any(REFERENCE_ADAPTER in name for name in trained)

    sft = PeftModel.from_pretrained(
        load_model("tiny-random", dtype=torch.float32, tokenizer=tokenizer), lora_run
    ).eval()
    with torch.no_grad():
        expected = sequence_logps(sft, batch, "cpu")[0]
        model.eval()
        start = sequence_logps(model, batch, "cpu")[0]
        model.train()

    def reference_logps():
        with torch.no_grad(), reference_policy(model, model):
            return sequence_logps(model, batch, "cpu")[0]

    torch.testing.assert_close(start, expected)  # the policy starts as the SFT model
    torch.testing.assert_close(reference_logps(), expected)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss_sum, _ = dpo_loss_sum(model, batch, "cpu", peft_model=model, beta=0.1, loss_type="ipo")
        loss_sum.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert model.active_adapter == "default"
        assert set(trainable_state_dict(model)) == set(trained)  # the reference never trains
    torch.testing.assert_close(reference_logps(), expected)
    with torch.no_grad():
        model.eval()
        assert (sequence_logps(model, batch, "cpu")[0] - expected).abs().max() > 1e-2


# ------------------------------------------------------------------------------ smoke runs


@pytest.mark.long
def test_dpo_smoke_run_raises_reward_accuracy_and_logs_the_metrics(tmp_path):
    from corral.evaluation.report import run_section
    from peft import PeftConfig
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from corral.rundir import read_run_info

    run_dir = tmp_path / "dpo"
    result = launch(
        "--config",
        str(DPO_SMOKE),
        f"output_dir={run_dir}",
        "max_steps=8",
        "eval_steps=8",
        "learning_rate=1e-3",  # 8 steps instead of the preset's 12, at twice its rate
    )
    assert "reference policy: the base (adapter disabled)" in result.stdout
    rows = metrics(run_dir)
    start = rows[0]
    assert start["step"] == 0 and start["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert start["eval_rewards/accuracies"] == 0.0  # policy == reference: no margin yet
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(name in r for r in steps) and f"eval_{name}" in rows[-1]
    late = [r["rewards/accuracies"] for r in steps[-4:]]
    assert steps[0]["rewards/accuracies"] == 0.0 and sum(late) / len(late) >= 0.75, late
    assert sum(r["loss"] for r in steps[-4:]) / 4 < math.log(2) - 0.1
    assert rows[-1]["eval_rewards/margins"] > 0 and rows[-1]["eval_loss"] < math.log(2)

    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["method"] == "dpo" and summary["train_metrics"]["step"] == 8
    assert summary["eval_metrics"]["rewards/accuracies"] == rows[-1]["eval_rewards/accuracies"]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train/rewards/accuracies", "train/rewards/margins"} <= set(events.Tags()["scalars"])

    info = read_run_info(run_dir)
    assert (info.method, info.kind) == ("dpo", "adapter")
    assert PeftConfig.from_pretrained(run_dir).task_type == "CAUSAL_LM"

    page = run_section(run_dir)
    assert "Reward accuracy" in page and "eval reward accuracy" in page and "Margin" in page


@pytest.mark.long
def test_reward_model_smoke_run_reports_heldout_accuracy_and_ranks_its_pairs(tmp_path):
    from corral.training.data import split_validation
    from corral.training.preference import RewardModel, read_preferences

    from corral.rundir import read_run_info

    run_dir = tmp_path / "reward"
    # Half the preset's steps: enough for the ranking to be learned, half the time.
    launch("--config", str(REWARD_SMOKE), f"output_dir={run_dir}", "max_steps=8", "eval_steps=8")
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["method"] == "reward" and summary["validation_examples"] == 8
    assert 0.0 <= summary["pairwise_accuracy"] <= 1.0
    assert summary["pairwise_accuracy"] == summary["eval_metrics"]["rewards/accuracies"]
    rows = metrics(run_dir)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]  # the held-out ranking loss went down
    assert (read_run_info(run_dir).method, read_run_info(run_dir).kind) == ("reward", "reward")

    reward = RewardModel.load(run_dir)
    train_records, _ = split_validation(read_preferences(PAIRS), 8, 42)
    scores = reward.score_pairs(train_records)
    ranked = sum(chosen > rejected for chosen, rejected in scores)
    assert ranked > len(scores) / 2, scores
    # Scoring through RewardModel gives the scores training saw (the same head, same last token).
    first = train_records[0]
    alone = reward.scores([first["prompt"]], [first["chosen"]])[0]
    assert alone == pytest.approx(scores[0][0], abs=1e-4)


# ------------------------------------------------------------------------------ exact resume


@pytest.fixture(scope="module")
def slow_sft_run(tmp_path_factory, tiny_model_path) -> Path:
    """A wider random LLaMA (slow enough per step that a kill lands mid-run) and an SFT adapter run
    on it, with random LoRA weights, for DPO to start from."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from corral.rundir import run_info_for_training, write_run_info
    from corral.templates import get_template

    root = tmp_path_factory.mktemp("dpo-resume")
    base = root / "base"
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
    model = LlamaForCausalLM(config)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    sft = root / "sft"
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, lora).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    write_run_info(
        sft,
        run_info_for_training(
            base_model=str(base),
            base_model_path=str(base),
            method="lora",
            template=get_template("alpaca", tokenizer),
            max_length=256,
            corral_version="test",
        ),
    )
    return sft


def resume_args(sft: Path, run_dir: Path) -> list[str]:
    base = json.loads((sft / "run_info.json").read_text())["base_model"]
    return [
        f"model={base}",
        f"init_adapter={sft}",
        f"data={PAIRS}",
        "max_steps=24",
        "save_steps=4",
        "eval_steps=0",
        "val_size=0",
        "micro_batch_size=2",
        "report_to=[none]",
        "lora_dropout=0.1",  # the policy's dropout draws random numbers: resume restores the RNG
        f"output_dir={run_dir}",
    ]


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    found = root.glob("checkpoint-*") if root.is_dir() else []
    return sorted(int(p.name.split("-")[1]) for p in found if (p / "trainer_state.json").exists())


@pytest.mark.long
def test_dpo_resume_after_sigkill_matches_the_uninterrupted_run(tmp_path, slow_sft_run):
    from corral.training.loop import train

    expected_dir = train(
        load_config(TrainConfig, DPO_SMOKE, resume_args(slow_sft_run, tmp_path / "whole"))
    )

    run_dir = tmp_path / "killed"
    args = ["--config", str(DPO_SMOKE), *resume_args(slow_sft_run, run_dir)]
    log = (tmp_path / "stdout.txt").open("w")
    proc = subprocess.Popen(
        [ACCELERATE, "launch", "train.py", *args],
        cwd=REPO,
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: bool(checkpoint_steps(run_dir)),
            timeout=120,
            what="a first DPO checkpoint",
            alive=lambda: None if proc.poll() is None else f"exit {proc.returncode}",
            interval=0.02,
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = checkpoint_steps(run_dir)[-1]
    assert killed_at < 24 and not (run_dir / "adapter_model.safetensors").exists()

    resumed = launch(*args, "resume=auto")
    assert f"checkpoint-{killed_at} at step {killed_at}" in resumed.stdout
    expected = load_file(str(expected_dir / "adapter_model.safetensors"))
    actual = load_file(str(run_dir / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys() and not any("reference" in k for k in actual)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == list(range(1, 25))
    whole = {m["step"]: m for m in metrics(expected_dir) if "loss" in m}
    for row in metrics(run_dir):
        if "loss" in row:
            assert row["rewards/margins"] == pytest.approx(
                whole[row["step"]]["rewards/margins"], abs=1e-5
            )


def test_reward_scores_need_a_reward_folder(lora_run):
    from corral.training.preference import RewardModel

    from corral.errors import RunDirError

    with pytest.raises(RunDirError, match="not a reward model"):
        RewardModel.load(lora_run)


@pytest.mark.parametrize(("loss_type", "expected"), [("sigmoid", math.log(2)), ("ipo", 25.0)])
def test_a_policy_equal_to_its_reference_has_no_margin(loss_type, expected):
    """sigmoid: -log sigmoid(0) = log 2; ipo: (0 - 1/(2 beta))^2 = 25 at beta 0.1."""
    from corral.training.preference import dpo_losses

    logps, tokens = torch.tensor([-3.0, -7.5]), torch.tensor([4, 9])
    losses, chosen, rejected = dpo_losses(
        logps, logps, logps, logps, beta=0.1, loss_type=loss_type, chosen_tokens=tokens,
        rejected_tokens=tokens,
    )  # fmt: skip
    torch.testing.assert_close(losses, torch.full((2,), expected))
    assert (chosen == 0).all() and (rejected == 0).all()

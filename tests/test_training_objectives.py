"""The method as a type: one objective per method, chosen once from the config (the loop never tests
its name); callbacks see a run's setup, steps, evaluations and saves in order; an objective's own
state and step metrics reach checkpoints and metrics.jsonl; the run directory's paths and lifecycle
(corral/rundir.py)."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
from corral.training import objectives
from corral.training.callbacks import TrainingCallback
from corral.training.config import METHOD_CHOICES, OBJECTIVE_WEIGHTS, OBJECTIVES, TrainConfig

from corral.config import load_config
from corral.errors import ConfigError, CorralError
from corral.rundir import (
    METHODS,
    WEIGHTS,
    RunDir,
    RunInfo,
    read_run_info,
    read_summary,
    run_info_for_training,
)

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "training" / "smoke.yaml"
DPO_SMOKE = REPO / "configs" / "training" / "dpo_smoke.yaml"
REWARD_SMOKE = REPO / "configs" / "training" / "reward_smoke.yaml"


def config(preset: Path = SMOKE, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, preset, ["model=tiny-random", "report_to=[none]", *overrides])


# ------------------------------------------------------------------------------ the seam


@pytest.mark.parametrize("module", ["training/loop.py", "training/model.py"])
def test_the_loop_and_model_setup_never_test_the_method_name(module):
    source = (REPO / module).read_text(encoding="utf-8")
    assert not re.search(r"method\s*(==|!=|\bin\b|\bnot in\b)", source)
    assert "PREFERENCE" not in source and "ADAPTER_METHODS" not in source


def test_one_list_names_the_objectives_and_the_choices_follow_it():
    assert tuple(objectives.OBJECTIVES) == OBJECTIVES == ("sft", "dpo", "reward", "grpo")
    assert {name: cls.name for name, cls in objectives.OBJECTIVES.items()} == {
        name: name for name in OBJECTIVES
    }
    hints = typing.get_type_hints(TrainConfig)
    assert typing.get_args(hints["method"]) == METHOD_CHOICES == (*OBJECTIVES, *WEIGHTS)
    assert typing.get_args(hints["weights"]) == ("", *WEIGHTS)
    # run_info.json's method: the weights of an sft run, else the objective.
    assert set(METHODS) == {*WEIGHTS, *OBJECTIVES} - {"sft"}


@pytest.mark.parametrize(
    ("preset", "overrides", "objective", "weights", "cls"),
    [
        (SMOKE, ["method=lora"], "sft", "lora", objectives.SupervisedFineTuning),
        (SMOKE, ["method=qlora"], "sft", "qlora", objectives.SupervisedFineTuning),
        (SMOKE, ["method=full"], "sft", "full", objectives.SupervisedFineTuning),
        (SMOKE, ["method=sft"], "sft", "lora", objectives.SupervisedFineTuning),
        (SMOKE, ["method=sft", "weights=full"], "sft", "full", objectives.SupervisedFineTuning),
        (DPO_SMOKE, [], "dpo", "lora", objectives.DirectPreference),
        (DPO_SMOKE, ["weights=qlora"], "dpo", "qlora", objectives.DirectPreference),
        (REWARD_SMOKE, [], "reward", "lora", objectives.RewardModelling),
    ],
)
def test_each_objective_is_chosen_from_the_config(preset, overrides, objective, weights, cls):
    chosen = config(preset, *overrides)
    assert (chosen.objective, chosen.weights) == (objective, weights)
    assert type(objectives.objective_for(chosen)) is cls


def test_a_legacy_method_is_sft_with_those_weights():
    legacy, explicit = config(SMOKE, "method=qlora"), config(SMOKE, "method=sft", "weights=qlora")
    assert (legacy.objective, legacy.weights) == (explicit.objective, explicit.weights)
    # Runs of every version record the method as before: the weights of an sft run.
    assert legacy.recorded_method == explicit.recorded_method == "qlora"
    assert config(DPO_SMOKE, "weights=qlora").recorded_method == "dpo"


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        (SMOKE, ["method=lora", "weights=full"], "key 'weights': method lora already means sft"),
        (DPO_SMOKE, ["weights=full"], "key 'weights': method dpo trains lora or qlora weights"),
        (REWARD_SMOKE, ["weights=qlora"], "key 'weights': method reward trains lora weights"),
        (SMOKE, ["method=sft", "weights=full", "use_dora=true"], "key 'use_dora'"),
    ],
)
def test_unsupported_weights_are_refused_naming_the_key(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(preset, *overrides)


def test_every_objective_names_its_weights():
    assert set(OBJECTIVE_WEIGHTS) == set(OBJECTIVES)
    assert all(set(allowed) <= set(WEIGHTS) for allowed in OBJECTIVE_WEIGHTS.values())


# ------------------------------------------------------------------------------ callbacks


class EventLog(TrainingCallback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_setup(self, run):
        self.events.append(("setup", run.step))

    def on_step_begin(self, run, batches):
        self.events.append(("begin", run.step, len(batches)))

    def on_step_end(self, run, result, batches):
        self.events.append(("end", run.step, round(result.loss, 6)))

    def on_evaluate(self, run, evaluation):
        self.events.append(("evaluate", run.step, round(evaluation["loss"], 6)))

    def on_save(self, run, checkpoint):
        assert RunDir.trainer_state_file(checkpoint).is_file()  # complete when announced
        self.events.append(("save", run.step, checkpoint.name))


def test_a_callback_sees_setup_steps_evaluations_and_saves_in_order(tmp_path, tiny_model_path):
    from corral.training.loop import train

    log = EventLog()
    run_dir = train(
        config(
            SMOKE,
            f"output_dir={tmp_path / 'run'}",
            "max_steps=4",
            "val_size=4",
            "eval_steps=2",
            "save_steps=2",
            "save_total_limit=0",
        ),
        callbacks=[log],
    )
    kinds = [event[0] for event in log.events]
    assert kinds == [
        "setup", "evaluate",
        "begin", "end", "begin", "end", "evaluate", "save",
        "begin", "end", "begin", "end", "evaluate", "save",
    ]  # fmt: skip
    assert [e[1] for e in log.events if e[0] in ("end", "evaluate", "save")] == [
        0,
        1,
        2,
        2,
        2,
        3,
        4,
        4,
        4,
    ]
    assert [e[2] for e in log.events if e[0] == "save"] == ["checkpoint-2", "checkpoint-4"]
    # What the callbacks saw is what metrics.jsonl holds.
    rows = [json.loads(line) for line in RunDir(run_dir).metrics_file.read_text().splitlines()]
    assert [e[2] for e in log.events if e[0] == "end"] == [r["loss"] for r in rows if "loss" in r]
    assert [e[2] for e in log.events if e[0] == "evaluate"] == [
        r["eval_loss"] for r in rows if "eval_loss" in r
    ]
    info = read_run_info(run_dir)
    assert (info.method, info.objective, info.weights, info.kind) == (
        "lora",
        "sft",
        "lora",
        "adapter",
    )
    assert (read_summary(run_dir)["objective"], read_summary(run_dir)["weights"]) == ("sft", "lora")


class CountingObjective(objectives.SupervisedFineTuning):
    """SFT with state (steps seen in this objective's life) and an extra step metric."""

    def __init__(self, config):
        super().__init__(config)
        self.steps_seen = 0
        self.restored: list[int] = []

    def make_batches(self, run, micro):
        self.steps_seen += 1
        return super().make_batches(run, micro)

    def step_metrics(self, run):
        return {"steps_seen": float(self.steps_seen)}

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state["steps_seen"]
        self.restored.append(state["steps_seen"])


def test_an_objectives_state_is_checkpointed_and_its_step_metrics_logged(
    tmp_path, tiny_model_path, monkeypatch
):
    from corral.training.loop import train

    made: list[CountingObjective] = []

    def counting(config):
        made.append(CountingObjective(config))
        return made[-1]

    monkeypatch.setitem(objectives.OBJECTIVES, "sft", counting)
    out = tmp_path / "run"
    common = [f"output_dir={out}", "val_size=0", "save_steps=1", "save_total_limit=0"]
    train(config(SMOKE, *common, "max_steps=2"))
    train(config(SMOKE, *common, "max_steps=3", "resume=auto"))
    assert made[0].restored == [] and made[1].restored == [2]  # from checkpoint-2
    rows = [json.loads(line) for line in RunDir(out).metrics_file.read_text().splitlines()]
    assert [(r["step"], r["steps_seen"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    files = sorted(p.name for p in RunDir(out).checkpoint(3).glob("objective_state_*"))
    assert files == ["objective_state_0.pt"]


# ------------------------------------------------------------------------------ the run directory


def test_a_run_directory_names_every_path(tmp_path):
    run = RunDir(tmp_path / "run")
    root = tmp_path / "run"
    assert (run.config_file, run.run_info_file, run.metrics_file, run.summary_file) == (
        root / "corral_config.yaml",
        root / "run_info.json",
        root / "metrics.jsonl",
        root / "train_summary.json",
    )
    assert (run.tensorboard_dir, run.checkpoints_dir) == (
        root / "tensorboard",
        root / "checkpoints",
    )
    assert run.eval_samples_file == root / "eval_samples.jsonl"
    assert run.lock_file == tmp_path / "run.lock"
    assert run.adapter_files == (root / "adapter_config.json", root / "adapter_model.safetensors")
    assert run.checkpoint(7) == root / "checkpoints" / "checkpoint-7"
    assert RunDir.trainer_state_file(run.checkpoint(7)).name == "trainer_state.json"


def checkpoint_at(run: RunDir, step: int, *, complete: bool = True) -> Path:
    folder = run.checkpoint(step)
    folder.mkdir(parents=True)
    if complete:
        RunDir.trainer_state_file(folder).write_text(json.dumps({"step": step}))
    return folder


def test_resume_auto_takes_the_latest_complete_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.resume_point("auto") is None and run.resume_point("") is None
    checkpoint_at(run, 2)
    ten = checkpoint_at(run, 10)
    checkpoint_at(run, 12, complete=False)  # killed while writing
    run.partial_checkpoint(14).mkdir()
    assert run.checkpoints() == [run.checkpoint(2), ten]
    assert run.resume_point("auto") == ten
    assert run.resume_point(str(run.checkpoint(2))) == run.checkpoint(2)
    with pytest.raises(ConfigError, match="key 'resume'"):
        run.resume_point(str(run.checkpoint(12)))


def test_claiming_refuses_a_finished_run_and_a_second_writer(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.run_info_file.write_text("{}")
    run.summary_file.write_text("{}")
    with pytest.raises(ConfigError, match="holds a finished run"):
        with run.claim(resume=True, overwrite=False):
            pass
    with run.claim(resume=False, overwrite=True):
        assert run.lock_file.is_file()
        assert not run.summary_file.exists() and not run.run_info_file.exists()  # replaced
        with pytest.raises(CorralError, match="run directory"):
            with RunDir(tmp_path / "run").claim(resume=False, overwrite=True):
                pass
    assert not run.lock_file.exists()


def test_claiming_continues_a_run_with_checkpoints_only_when_resuming(tmp_path):
    run = RunDir(tmp_path / "run")
    checkpoint_at(run, 3)
    with pytest.raises(ConfigError, match="resume=auto"):
        with run.claim(resume=False, overwrite=False):
            pass
    with run.claim(resume=True, overwrite=False):
        assert run.latest_checkpoint() == run.checkpoint(3)  # kept, to continue


@pytest.mark.parametrize(
    ("tuned", "kind"),
    [
        (config(SMOKE, "method=sft", "weights=full"), "full"),
        (config(SMOKE, "method=qlora"), "adapter"),
        (config(DPO_SMOKE, "weights=qlora"), "adapter"),
        (config(REWARD_SMOKE), "reward"),
    ],
)
def test_run_info_records_objective_and_weights_and_the_method_as_before(tuned, kind):
    from corral.templates import dolly_template

    info = run_info_for_training(
        base_model="tiny-random",
        base_model_path="",
        method=tuned.recorded_method,
        objective=tuned.objective,
        weights=tuned.weights,
        template=dolly_template(),
        max_length=256,
        corral_version="0",
    )
    assert info.kind == kind
    assert info.method in METHODS  # what earlier versions read
    assert (info.to_dict()["objective"], info.to_dict()["weights"]) == (
        tuned.objective,
        tuned.weights,
    )


def test_serving_states_how_long_the_run_trained():
    info = RunInfo(base_model="b", method="lora", template="alpaca", kind="adapter", max_length=512)
    note = info.beyond_training_note(8192)
    assert "at most 512 tokens" in note and "8192" in note
    assert info.beyond_training_note(512) is None
    assert RunInfo("b", "lora", "alpaca", "adapter").beyond_training_note(8192) is None


def test_tools_watch_a_run_through_callbacks_not_by_replacing_loop_functions():
    tools = [REPO / "scripts" / "gpu_check.py", *sorted((REPO / "benchmarks").glob("*.py"))]
    for path in tools:
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"loop\.\w+\s*(,\s*loop\.\w+\s*)*=[^=]", source), path
        assert "runpy" not in source, path
    assert "TrainingCallback" in tools[0].read_text(encoding="utf-8")

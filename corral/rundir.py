"""The run directory: what training writes, what export and inference read. Its one owner.

A folder Corral made for a model records how to use it in `run_info.json`: the base model, the
method, and the prompt template with its markers (a model prompted in another format than it
learned answers badly). Four kinds of folder carry one:

- `adapter`: a LoRA/QLoRA run, or a DPO run (method `dpo`, a LoRA adapter too):
  `adapter_config.json` + `adapter_model.safetensors` (plain PEFT), the tokenizer, and the base
  model named in `run_info.json`;
- `full`: a full fine-tune: a plain transformers model folder (`config.json` + weights);
- `merged`: `corral export --merge` of an adapter run: a plain transformers model folder;
- `reward`: a reward model (method `reward`): the same two adapter files, but a peft SEQ_CLS
  adapter for the base loaded as a sequence classifier with one label: LoRA on the backbone plus
  the `score` head (hidden size -> 1, as `modules_to_save`); it scores answers, it does not
  generate (training.preference.RewardModel loads it).

Beside those, a training run holds `corral_config.yaml` (the resolved config), `metrics.jsonl`,
`train_summary.json`, `tensorboard/`, `checkpoints/checkpoint-STEP/` (each with
`trainer_state.json`) and, for an objective that samples completions when it evaluates,
`eval_samples.jsonl`. `RunDir` builds every one of these paths and owns the folder's lifecycle:
claim it (a lock beside it), refuse a finished run or foreign files unless asked to replace them,
replace, or resume from the latest complete checkpoint. Pure: JSON, paths and file locks only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from corral.errors import ConfigError, RecordError, RunDirError
from corral.fileio import atomic_write_text, check_output_path, exclusive_output, lock_path
from corral.templates import TEMPLATE_NAMES

RUN_INFO_FILE = "run_info.json"
CONFIG_FILE = "corral_config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "train_summary.json"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"  # completions an objective samples at its evaluations
TRAINER_STATE_FILE = "trainer_state.json"  # in each checkpoint: the step it holds
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # present when the run saved its tokenizer

WEIGHTS = ("lora", "qlora", "full")  # what a run trains (training/config.py: `weights`)
# run_info.json's `method`: the weights of an sft run, or the objective (dpo, reward, grpo).
METHODS = (*WEIGHTS, "dpo", "reward", "grpo")
KINDS = ("adapter", "full", "merged", "reward")
_KIND_OF_METHOD = {"full": "full", "reward": "reward"}  # every other method leaves an adapter
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# The markers a run trained with; inference checks that its template still gives the same ones.
MARKER_FIELDS = ("response_marker", "end_marker")


@dataclass(frozen=True)
class RunInfo:
    """The contents of `run_info.json`."""

    base_model: str  # the name the run was given (embedded, a hub id, a folder)
    method: str  # lora | qlora | full (sft with those weights) | dpo | reward | grpo
    template: str  # alpaca | dolly | chat
    kind: str  # adapter | full | merged | reward: what the folder holds
    base_model_path: str = ""  # where the base was found when training ran
    # The longest example the run trained on. `corral serve` states it at start when the model's
    # context is longer (`beyond_training_note`): a warning, not a limit, because the base still
    # reads longer contexts and a long prompt with a short answer is often fine, but quality past
    # it is untested by the fine-tune. Bounding requests by it would refuse what the base can do.
    max_length: int | None = None
    objective: str | None = None  # sft | dpo | reward | grpo (absent in runs of earlier versions)
    weights: str | None = None  # lora | qlora | full (absent in runs of earlier versions)
    response_marker: str | None = None
    end_marker: str | None = None
    completion_suffix: str | None = None
    corral_version: str = ""
    merged_from: str | None = None  # merged exports: the run directory they came from
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    def base_model_location(self) -> str:
        """The base to load an adapter onto: the recorded path while it exists, else the name."""
        if self.base_model_path and Path(self.base_model_path).exists():
            return self.base_model_path
        return self.base_model

    def merged(self, source_run: str | os.PathLike) -> RunInfo:
        """The record of a merged export of this adapter run."""
        return replace(self, kind="merged", merged_from=str(Path(source_run).resolve()))

    def check_template(self, template: Any, folder: str | os.PathLike) -> None:
        """The markers rebuilt from `template` must be the ones the run trained with."""
        for key in MARKER_FIELDS:
            recorded = getattr(self, key)
            current = getattr(template, key)
            if recorded is not None and recorded != current:
                raise RunDirError(
                    f"{Path(folder) / RUN_INFO_FILE}: field '{key}': the run trained with "
                    f"{recorded!r} but template {template.name!r} now gives {current!r}; the "
                    "tokenizer or template changed"
                )

    def beyond_training_note(self, context_length: int) -> str | None:
        """A warning when the model reads further than the run trained (None if it does not)."""
        if self.max_length is None or context_length <= self.max_length:
            return None
        return (
            f"trained on examples of at most {self.max_length} tokens (run_info.json max_length); "
            f"prompts plus answers up to the context of {context_length} are served, but the "
            "fine-tune never saw them that long"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        return {**extra, **{k: v for k, v in data.items() if v is not None}}


def has_run_info(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a folder Corral made for a model (a run or a merged export)."""
    return (Path(folder) / RUN_INFO_FILE).is_file()


def run_info_for_training(
    *,
    base_model: str,
    base_model_path: str,
    method: str,
    template: Any,
    max_length: int,
    corral_version: str,
    objective: str | None = None,
    weights: str | None = None,
) -> RunInfo:
    """The record a training run writes when it finishes (`method` as earlier versions wrote it:
    the weights of an sft run, else the objective)."""
    return RunInfo(
        base_model=base_model,
        base_model_path=base_model_path,
        method=method,
        template=template.name,
        kind="full" if weights == "full" else _KIND_OF_METHOD.get(method, "adapter"),
        max_length=max_length,
        objective=objective,
        weights=weights,
        response_marker=template.response_marker,
        end_marker=template.end_marker,
        completion_suffix=template.completion_suffix,
        corral_version=corral_version,
    )


def write_run_info(folder: str | os.PathLike, info: RunInfo) -> Path:
    """Write `run_info.json` into `folder` atomically."""
    path = Path(folder) / RUN_INFO_FILE
    atomic_write_text(path, json.dumps(info.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


def read_run_info(folder: str | os.PathLike, *, check_files: bool = True) -> RunInfo:
    """Read and validate `folder/run_info.json`; with `check_files`, the weights must be there too."""
    folder = Path(folder)
    path = folder / RUN_INFO_FILE
    if not folder.is_dir():
        raise RunDirError(f"{folder}: no such run directory")
    if not path.is_file():
        raise RunDirError(
            f"{path}: missing; a training run or merged export records its base model and "
            "template there"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object")
    for key in ("base_model", "method", "template"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise RunDirError(f"{path}: field '{key}' is missing or not a string")
    data = _upgrade(data)
    if data["template"] not in TEMPLATE_NAMES:
        raise RunDirError(
            f"{path}: field 'template': unknown template {data['template']!r} "
            f"(expected one of {', '.join(TEMPLATE_NAMES)})"
        )
    if data["method"] not in METHODS:
        raise RunDirError(
            f"{path}: field 'method': expected {', '.join(METHODS)}, got {data['method']!r}"
        )
    if data["kind"] not in KINDS:
        raise RunDirError(
            f"{path}: field 'kind': expected {', '.join(KINDS)}, got {data['kind']!r}"
        )
    known = {f for f in RunInfo.__dataclass_fields__ if f != "extra"}
    info = RunInfo(
        **{k: v for k, v in data.items() if k in known},
        extra={k: v for k, v in data.items() if k not in known},
    )
    if check_files:
        _check_weights(folder, info)
    return info


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Records written before `kind` existed: infer it (merged exports said method 'merged')."""
    data = dict(data)
    if "kind" not in data:
        if data["method"] == "merged":
            data["method"], data["kind"] = "lora", "merged"
        else:
            data["kind"] = _KIND_OF_METHOD.get(data["method"], "adapter")
    return data


def _check_weights(folder: Path, info: RunInfo) -> None:
    if info.kind in ("adapter", "reward"):
        for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise RunDirError(f"{folder}: {name} is missing; did the run finish?")
        check_safetensors(folder / ADAPTER_WEIGHTS_FILE)
        return
    what = "full fine-tune" if info.kind == "full" else "merged export"
    if not (folder / MODEL_CONFIG_FILE).is_file():
        raise RunDirError(f"{folder}: {MODEL_CONFIG_FILE} of the {what} is missing")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise RunDirError(f"{folder}: no *.safetensors weights of the {what}")
    for path in weights:
        check_safetensors(path)


def check_safetensors(path: Path) -> None:
    """A safetensors file is whole: its header parses and every tensor lies inside the file.

    Read from the header alone (8 bytes of length, then JSON), so a file cut short by a crash or a
    full disk is named here, in one line, instead of failing deep inside a loader.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > size - 8:
                raise ValueError("the header is cut off")
            header = json.loads(handle.read(length))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: not a whole safetensors file ({exc})") from None
    if 8 + length + end > size:
        raise RunDirError(
            f"{path}: truncated ({size} bytes, its header describes {8 + length + end}); was the "
            "run or copy interrupted?"
        )


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's `metrics.jsonl` (empty when the run logged none)."""
    path = RunDir(run_dir).metrics_file
    if not path.is_file():
        return []
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RecordError(path, f"invalid JSON: {exc.msg}", line=line_no) from None
    return rows


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A finished run's `train_summary.json`."""
    path = RunDir(run_dir).summary_file
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing; did the run finish?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: invalid JSON: {exc}") from None


class RunDir:
    """A training run directory: every path in it, and its lifecycle (claim, refuse, replace, resume).

    The weights (an adapter or a model folder) and the tokenizer lie at the top, where peft and
    transformers put them; everything else has a name here and nowhere else.
    """

    # What a run writes before its first checkpoint: a folder holding only these is an interrupted
    # start, which a new launch starts afresh.
    START_FILES = frozenset(
        {CONFIG_FILE, METRICS_FILE, EVAL_SAMPLES_FILE, TENSORBOARD_DIR, CHECKPOINTS_DIR}
    )
    # What replacing a run removes (its weights are overwritten by the new run's).
    RUN_RECORDS = (CHECKPOINTS_DIR, RUN_INFO_FILE, SUMMARY_FILE, METRICS_FILE, EVAL_SAMPLES_FILE)

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ---- paths

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def run_info_file(self) -> Path:
        return self.root / RUN_INFO_FILE

    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def summary_file(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def eval_samples_file(self) -> Path:
        return self.root / EVAL_SAMPLES_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def lock_file(self) -> Path:
        """Held (flock) by the launch writing the run; beside the folder, so replacing keeps it."""
        return lock_path(self.root)

    @property
    def adapter_files(self) -> tuple[Path, Path]:
        """(adapter_config.json, adapter_model.safetensors) of an adapter or reward run."""
        return self.root / ADAPTER_CONFIG_FILE, self.root / ADAPTER_WEIGHTS_FILE

    @property
    def tokenizer_config_file(self) -> Path:
        return self.root / TOKENIZER_CONFIG_FILE

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"checkpoint-{step}"

    def partial_checkpoint(self, step: int) -> Path:
        """Where a checkpoint is written before it is renamed whole (ignored when listing)."""
        return self.checkpoints_dir / f".tmp-checkpoint-{step}"

    @staticmethod
    def trainer_state_file(checkpoint: str | os.PathLike) -> Path:
        return Path(checkpoint) / TRAINER_STATE_FILE

    # ---- checkpoints

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (partial folders of interrupted saves are not)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for child in self.checkpoints_dir.iterdir():
            match = _CHECKPOINT_NAME.match(child.name)
            if match and self.trainer_state_file(child).is_file():
                found.append((int(match.group(1)), child))
        return [path for _, path in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def resume_point(self, resume: str) -> Path | None:
        """The checkpoint `resume` names: "" none, "auto" the latest (if any), else a folder."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest_checkpoint()
        checkpoint = Path(resume)
        if not self.trainer_state_file(checkpoint).is_file():
            raise ConfigError(f"key 'resume': {checkpoint} is not a complete checkpoint folder")
        return checkpoint

    # ---- lifecycle

    @contextlib.contextmanager
    def claim(self, *, resume: bool, overwrite: bool) -> Iterator[None]:
        """Hold the run for this launch: one writer at a time (the lock), and never over a finished
        run or other files unless `overwrite` (see `prepare`)."""
        check_output_path(self.root, folder=True, what="output_dir")
        with exclusive_output(self.root, what="run directory"):
            self.prepare(resume=resume, overwrite=overwrite)
            yield

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse a folder that holds another run or other files, unless asked to replace it."""
        if not self.root.exists():
            return
        if self.latest_checkpoint() is not None:
            if resume:
                return  # continue it
            if not overwrite:
                raise ConfigError(
                    f"{self.root} holds checkpoints of an earlier run: set resume=auto to continue "
                    "it, overwrite_output_dir=true to replace it, or choose another output_dir"
                )
        else:
            found = sorted(e.name for e in self.root.iterdir() if not e.name.startswith("."))
            if not set(found) - self.START_FILES:
                return  # empty, or a run stopped before its first checkpoint: start it afresh
            if not overwrite:
                what = "a finished run" if self.run_info_file.is_file() else "other files"
                raise ConfigError(
                    f"{self.root} holds {what} ({', '.join(found[:5])}"
                    f"{', ...' if len(found) > 5 else ''}): choose another output_dir, or set "
                    "overwrite_output_dir=true to replace it"
                )
        for name in self.RUN_RECORDS:
            path = self.root / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

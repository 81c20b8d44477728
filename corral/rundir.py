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
`train_summary.json`, `tensorboard/` and `checkpoints/`. Pure: JSON and paths only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from corral.errors import RecordError, RunDirError
from corral.fileio import atomic_write_text
from corral.templates import TEMPLATE_NAMES

RUN_INFO_FILE = "run_info.json"
CONFIG_FILE = "corral_config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "train_summary.json"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_CONFIG_FILE = "config.json"

METHODS = ("lora", "qlora", "full", "dpo", "reward", "grpo")
KINDS = ("adapter", "full", "merged", "reward")
_KIND_OF_METHOD = {"full": "full", "reward": "reward"}  # every other method leaves an adapter
# The markers a run trained with; inference checks that its template still gives the same ones.
MARKER_FIELDS = ("response_marker", "end_marker")


@dataclass(frozen=True)
class RunInfo:
    """The contents of `run_info.json`."""

    base_model: str  # the name the run was given (embedded, a hub id, a folder)
    method: str  # lora | qlora | full | dpo | reward | grpo: how the weights were trained
    template: str  # alpaca | dolly | chat
    kind: str  # adapter | full | merged | reward: what the folder holds
    base_model_path: str = ""  # where the base was found when training ran
    max_length: int | None = None
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
) -> RunInfo:
    """The record a training run writes when it finishes."""
    return RunInfo(
        base_model=base_model,
        base_model_path=base_model_path,
        method=method,
        template=template.name,
        kind=_KIND_OF_METHOD.get(method, "adapter"),
        max_length=max_length,
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
    path = Path(run_dir) / METRICS_FILE
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

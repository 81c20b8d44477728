"""Load what inference runs on: a base model, a base + adapter run directory, or a merged model.

A run directory (written by training) holds `run_info.json` naming the base model and the prompt
template the run was trained with; inference uses exactly that template, because a model served
with a different template than it learned answers badly (the classic train/serve template drift).
Devices: fp32 on CPU, bf16 on a GPU that supports it, optionally 4-bit NF4 (bitsandbytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.cli import UsageError
from corral.config import ConfigError
from corral.templates import TEMPLATE_NAMES, PromptTemplate, get_template
from inference.extraction import ResponseMarkers

RUN_INFO_FILE = "run_info.json"
RUN_INFO_REQUIRED = ("base_model", "method", "template")


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer and template it must be used with."""

    model: Any
    tokenizer: Any
    template: PromptTemplate
    name: str  # what clients call it (the model name or the run directory's name)
    source: str  # "model" | "run"
    context_length: int
    run_info: dict[str, Any] = field(default_factory=dict)

    @property
    def markers(self) -> ResponseMarkers:
        """The template's markers, with token ids where a marker is a single token."""
        return ResponseMarkers(
            response_marker=self.template.response_marker,
            end_marker=self.template.end_marker,
            response_marker_id=single_token_id(self.tokenizer, self.template.response_marker),
            end_marker_id=single_token_id(self.tokenizer, self.template.end_marker),
        )

    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a templated answer: the end marker when it is one token, and EOS."""
        ids = {self.tokenizer.eos_token_id, self.markers.end_marker_id}
        return tuple(sorted(i for i in ids if i is not None))

    def stop_strings(self) -> tuple[str, ...]:
        """The end marker as text when it spans several tokens (Dolly's `### End`)."""
        return () if self.markers.end_marker_id is not None else (self.template.end_marker,)

    def decode_keeping_special(self, ids: Any) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of `text` when the tokenizer encodes it as exactly one token, else None."""
    if not text:
        return None
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """The run directory's `run_info.json`, checked for the fields inference needs."""
    path = Path(run_dir) / RUN_INFO_FILE
    if not Path(run_dir).is_dir():
        raise UsageError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise ConfigError(
            f"{path}: missing; a training run directory records its base model and template there"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    for key in RUN_INFO_REQUIRED:
        if not isinstance(info.get(key), str) or not info[key]:
            raise ConfigError(f"{path}: field '{key}' is missing or not a string")
    if info["template"] not in TEMPLATE_NAMES:
        raise ConfigError(
            f"{path}: field 'template': unknown template {info['template']!r} "
            f"(expected one of {', '.join(TEMPLATE_NAMES)})"
        )
    if info["method"] not in ("lora", "qlora", "full"):
        raise ConfigError(
            f"{path}: field 'method': expected lora, qlora or full, got {info['method']!r}"
        )
    return info


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(
    model: str | None = None,
    *,
    run: str | Path | None = None,
    template: str | None = None,
    quantization: str | None = None,
    dtype: Any = None,
    device: str | None = None,
    merge_adapter: bool = True,
) -> LoadedModel:
    """Load `model` (a name or folder, a merged model included) or the run directory `run`.

    A run uses the template it recorded; asking for another is an error. A plain model uses
    `template`, else its chat template when the tokenizer has one, else Alpaca's. LoRA weights are
    merged into the base for faster generation unless the base is quantized or `merge_adapter` is
    False.
    """
    from corral.models import (
        default_dtype,
        load_model,
        load_tokenizer,
        quiet_transformers,
        resolve_model,
    )

    if (model is None) == (run is None):
        raise UsageError("give exactly one of a model (--model) or a run directory (--run)")
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    device_map = {"": device} if quantization or device != "cpu" else None

    with quiet_transformers():
        if run is None:
            tokenizer = load_tokenizer(model, padding_side="left")
            loaded = load_model(
                model,
                dtype=dtype,
                quantization=quantization,
                device_map=device_map,
                tokenizer=tokenizer,
            )
            template_name = template or (
                "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
            )
            name, source, info = model, "model", {}
        else:
            run_path = Path(run)
            info = read_run_info(run_path)
            if template is not None and template != info["template"]:
                raise UsageError(
                    f"{run_path}: this run was trained with template {info['template']!r}; "
                    f"serving it with {template!r} would not match what it learned"
                )
            template_name = info["template"]
            has_tokenizer = (run_path / "tokenizer_config.json").is_file()
            if (run_path / "adapter_config.json").is_file():
                base = info.get("base_model_path") or ""
                if not base or not Path(base).exists():
                    base = resolve_model(info["base_model"])
                tokenizer = load_tokenizer(
                    str(run_path) if has_tokenizer else base, padding_side="left"
                )
                base_model = load_model(
                    base,
                    dtype=dtype,
                    quantization=quantization,
                    device_map=device_map,
                    tokenizer=tokenizer,
                )
                loaded = _attach_adapter(
                    base_model, run_path, merge=merge_adapter and not quantization
                )
            elif (run_path / "config.json").is_file():
                tokenizer = load_tokenizer(str(run_path), padding_side="left")
                loaded = load_model(
                    str(run_path),
                    dtype=dtype,
                    quantization=quantization,
                    device_map=device_map,
                    tokenizer=tokenizer,
                )
            else:
                raise ConfigError(
                    f"{run_path}: neither adapter_config.json (LoRA/QLoRA) nor config.json "
                    "(full fine-tune) is there; is training finished?"
                )
            name, source = run_path.resolve().name, "run"

    if device_map is None and device != "cpu":
        loaded.to(device)
    loaded.eval()
    try:
        prompt_template = get_template(template_name, tokenizer)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if info:
        _check_recorded_markers(info, prompt_template, Path(run))
    from inference.engine import _context_length

    return LoadedModel(
        model=loaded,
        tokenizer=tokenizer,
        template=prompt_template,
        name=name,
        source=source,
        context_length=_context_length(loaded, tokenizer),
        run_info=info,
    )


def _attach_adapter(base_model: Any, run_path: Path, *, merge: bool) -> Any:
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(base_model, str(run_path))
    return adapted.merge_and_unload() if merge else adapted


def _check_recorded_markers(info: dict[str, Any], template: PromptTemplate, run_path: Path) -> None:
    """The markers rebuilt from the template must be the ones the run trained with."""
    for key in ("response_marker", "end_marker"):
        recorded = info.get(key)
        current = getattr(template, key)
        if recorded is not None and recorded != current:
            raise ConfigError(
                f"{run_path / RUN_INFO_FILE}: field '{key}': the run trained with {recorded!r} but "
                f"template {template.name!r} now gives {current!r}; the tokenizer or template changed"
            )

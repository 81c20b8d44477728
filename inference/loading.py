"""Load what inference runs on: a base model, a base + adapter run directory, or a merged model.

A folder Corral made (a run directory, or a merged export; `corral.rundir`) records the prompt
template the model was trained with; inference uses exactly that template, because a model served
with a different template than it learned answers badly (the classic train/serve template drift).
Devices: fp32 on CPU, bf16 on a GPU that supports it, optionally 4-bit NF4 (bitsandbytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.inference.extraction import ResponseMarkers

from corral.errors import UsageError
from corral.rundir import RunDir, RunInfo, has_run_info, read_run_info
from corral.templates import (
    PromptTemplate,
    get_template,
    single_token_id,
    stop_strings,
    stop_token_ids,
)


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer and template it must be used with."""

    model: Any
    tokenizer: Any
    template: PromptTemplate
    name: str  # what clients call it (the model name or the run directory's name)
    source: str  # "model" | "run"
    context_length: int
    run_info: RunInfo | None = None  # for folders Corral made: runs and merged exports
    # Whether engines may change the model in place (packed CPU weights); False for a model that
    # other code still uses as a transformers model.
    owns_model: bool = True

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
        return stop_token_ids(self.tokenizer, self.template)

    def stop_strings(self) -> tuple[str, ...]:
        """The end marker as text when it spans several tokens (Dolly's `### End`)."""
        return stop_strings(self.tokenizer, self.template)

    def decode_keeping_special(self, ids: Any) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def make_engine(self, max_batch_size: int, **engine_options: Any) -> Any:
        """A batching engine (`inference.engine.GenerationEngine`) over this model.

        When `owns_model`, the engine packs the linear weights for oneDNN in place on a CPU
        (`inference.decode_step.pack_linear_weights`).
        """
        from corral.inference.engine import GenerationEngine

        return GenerationEngine(
            self.model,
            self.tokenizer,
            max_batch_size=max_batch_size,
            context_length=self.context_length,
            pack_weights=self.owns_model,
            **engine_options,
        )


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
    """Load `model` (a name or folder) or the run directory `run`.

    A folder Corral made (a run directory or a merged export, given as `model` or `run`) uses the
    template it recorded; asking for another is an error. Any other model uses `template`, else its
    chat template when the tokenizer has one, else Alpaca's. LoRA weights are merged into the base
    for faster generation unless the base is quantized or `merge_adapter` is False.
    """
    from corral.inference.engine import context_length_of

    from corral.models import default_dtype, load_model, load_tokenizer, quiet_transformers

    if (model is None) == (run is None):
        raise UsageError("give exactly one of a model (--model) or a run directory (--run)")
    if run is None and has_run_info(model):
        run = model  # a merged export (or a run named with --model) keeps its own template
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    device_map = {"": device} if quantization or device != "cpu" else None
    info: RunInfo | None = None
    with quiet_transformers():
        if run is None:
            folder = model
            template_name = template
        else:
            folder = Path(run)
            info = read_run_info(folder)
            if template is not None and template != info.template:
                raise UsageError(
                    f"{folder}: this model was trained with template {info.template!r}; "
                    f"serving it with {template!r} would not match what it learned"
                )
            template_name = info.template
        if info is not None and info.kind == "adapter":
            base = info.base_model_location()
            has_tokenizer = RunDir(folder).tokenizer_config_file.is_file()
            tokenizer = load_tokenizer(str(folder) if has_tokenizer else base, padding_side="left")
            base_model = load_model(
                base,
                dtype=dtype,
                quantization=quantization,
                device_map=device_map,
                tokenizer=tokenizer,
            )
            loaded = _attach_adapter(base_model, folder, merge=merge_adapter and not quantization)
        else:
            tokenizer = load_tokenizer(str(folder), padding_side="left")
            loaded = load_model(
                str(folder),
                dtype=dtype,
                quantization=quantization,
                device_map=device_map,
                tokenizer=tokenizer,
            )
        if template_name is None:
            template_name = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"

    if device_map is None and device != "cpu":
        loaded.to(device)
    loaded.eval()
    try:
        prompt_template = get_template(template_name, tokenizer)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if info is not None:
        info.check_template(prompt_template, folder)
    return LoadedModel(
        model=loaded,
        tokenizer=tokenizer,
        template=prompt_template,
        name=Path(folder).resolve().name if info is not None else str(model),
        source="model" if info is None else "run",
        context_length=context_length_of(loaded, tokenizer),
        run_info=info,
    )


def _attach_adapter(base_model: Any, run_path: Path, *, merge: bool) -> Any:
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(base_model, str(run_path))
    return adapted.merge_and_unload() if merge else adapted

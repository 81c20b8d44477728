"""`corral export RUN --gguf OUT.gguf`: one file for llama.cpp and Ollama, and a Modelfile beside it.

The GGUF holds the merged weights (f32, f16, or q8_0 where the `gguf` package can quantize), the
model's shape under llama.cpp's `llama.*` keys, the tokenizer (vocabulary, merges, special ids) and
the run's chat template as `tokenizer.chat_template`, so llama.cpp's `--jinja` chat and Ollama
prompt the model in the format it was trained with. Ollama also reads the `Modelfile` written
beside it: `FROM` the file, a `TEMPLATE` in Ollama's Go-template syntax rendering the run's format,
and a `PARAMETER stop` for the end marker and for EOS (Dolly's `### End` spans tokens, so only a
stop string ends an answer there).

What is converted: LLaMA-architecture models (SmolLM2, LLaMA, Mistral-style without sliding
window) with byte-level BPE tokenizers (GPT-2 style: SmolLM2, LLaMA 3). Anything else is refused
with the reason, before any work. The weights are streamed tensor by tensor from the folder's
safetensors: memory holds one tensor at a time, not the model.

llama.cpp stores the query and key projections with each head's rotary halves interleaved (it
rotates adjacent pairs; transformers rotates the two halves), so those two are permuted on the
way in; readers (llama.cpp, transformers' GGUF loader) undo it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.training.export import carry_template_for_engines, merge_run

from corral.errors import UsageError
from corral.fileio import (
    atomic_write_text,
    check_output_path,
    exclusive_output,
    temporary_folder_beside,
)
from corral.rundir import MODEL_CONFIG_FILE, RunDir, RunInfo, read_run_info
from corral.templates import PromptTemplate, adds_bos, get_template, stop_token_ids

GGUF_TYPES = ("f32", "f16", "q8_0")
MODELFILE_NAME = "Modelfile"

# llama.cpp's names for the pre-tokenizers of byte-level BPE vocabularies, by the shape of the
# `pre_tokenizer` in tokenizer.json (the split rules must match the ones the merges were learned on).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _Plan:
    """One tensor of the output: where it comes from and how it is stored."""

    source: str  # the safetensors key
    name: str  # the GGUF tensor name
    shape: tuple[int, ...]
    kind: str  # f32 | f16 | q8_0
    permute_heads: int = 0  # query/key projections: the head count to interleave, else 0


def export_gguf(
    run_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    gguf_type: str = "f16",
    merge_dir: str | os.PathLike | None = None,
    dtype: str = "float32",
) -> Path:
    """Write RUN as a GGUF file at `out_path`, with an Ollama Modelfile beside it.

    An adapter run is merged first: into `merge_dir` when given (the `--merge` export, kept), else
    into a temporary folder beside the output that is removed afterwards. A merged export or a full
    fine-tune is converted as it is.
    """
    run = Path(run_dir)
    out = Path(out_path)
    info = read_run_info(run)
    if info.kind == "reward":
        raise UsageError(f"{run}: a reward model scores answers; there is nothing to chat with")
    if out.suffix != ".gguf":
        raise UsageError(f"{out}: the GGUF file name must end with .gguf")
    check_output_path(out, inputs=(run,), what="GGUF file")
    check_output_path(out.parent / MODELFILE_NAME, inputs=(run,), what="Modelfile")
    _check_gguf_type(gguf_type)
    if info.kind != "adapter":
        if merge_dir is not None:
            raise UsageError(
                f"{run}: a {info.kind} model folder has no adapter to merge; drop --merge"
            )
        _check_convertible(run)
        return write_gguf(run, out, gguf_type=gguf_type)
    if merge_dir is not None:
        # Refuse a bad --merge folder before the merge's minutes of work, not after.
        check_output_path(merge_dir, inputs=(run,), what="export", folder=True)
        _check_convertible_base(run, info)
        merged = merge_run(run, merge_dir, dtype=dtype)
        return write_gguf(merged, out, gguf_type=gguf_type)
    _check_convertible_base(run, info)
    folder = temporary_folder_beside(out)
    try:
        merged = merge_run(run, folder, dtype=dtype)
        return write_gguf(merged, out, gguf_type=gguf_type, source_run=run)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check_gguf_type(gguf_type: str) -> None:
    """Refuse a `--gguf-type` this `gguf` package cannot write."""
    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if gguf_type == "q8_0":
        try:
            quants.quantize(np.zeros((1, 32), dtype=np.float32), GGMLQuantizationType.Q8_0)
        except NotImplementedError:
            raise UsageError(
                "the installed gguf package cannot quantize to q8_0; use --gguf-type f16 or f32"
            ) from None


def _check_convertible_base(run: Path, info: RunInfo) -> None:
    """An adapter run's base and tokenizer must be convertible: refuse before merging, not after."""
    location = Path(info.base_model_location())
    if (location / MODEL_CONFIG_FILE).is_file():
        has_tokenizer = RunDir(run).tokenizer_config_file.is_file()
        _check_convertible(location, run if has_tokenizer else location)


def _check_convertible(folder: Path, tokenizer_folder: Path | None = None) -> None:
    """Refuse, before any work, a model or tokenizer this module cannot write."""
    _model_shape(_read_config(folder), folder)
    from transformers import AutoTokenizer

    from corral.models import quiet_transformers

    tokenizer_folder = tokenizer_folder or folder
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    _tokenizer_pre(tokenizer, tokenizer_folder)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{path}: missing; a model folder to convert has its config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: invalid JSON: {exc}") from None


def _model_shape(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The `llama.*` keys for `config`, or the reason this model cannot be written as GGUF."""
    where = folder / MODEL_CONFIG_FILE
    if config.get("model_type") != "llama":
        raise UsageError(
            f"{where}: GGUF export converts LLaMA-architecture models; this one is "
            f"{config.get('model_type')!r}"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise UsageError(f"{where}: rope scaling {rope_type!r} is not converted to GGUF yet")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise UsageError(f"{where}: projection biases are not converted to GGUF yet")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    shape = {
        "context_length": config["max_position_embeddings"],
        "embedding_length": hidden,
        "feed_forward_length": config["intermediate_size"],
        "block_count": config["num_hidden_layers"],
        "attention.head_count": heads,
        "attention.head_count_kv": config.get("num_key_value_heads") or heads,
        "rope.dimension_count": head_dim,
        "rope.freq_base": float(theta),
        "attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        "vocab_size": config["vocab_size"],
    }
    if head_dim != hidden // heads:
        shape["attention.key_length"] = head_dim
        shape["attention.value_length"] = head_dim
    return shape


def _tokenizer_pre(tokenizer: Any, folder: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or why it cannot be written."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    byte_level = kinds and kinds[-1] == "ByteLevel"
    if model.get("type") != "BPE" or not byte_level or spec.get("normalizer"):
        raise UsageError(
            f"{folder}: GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and "
            f"LLaMA 3 have); this one is {model.get('type')} with pre-tokenizer {kinds}"
        )
    last = steps[-1]
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and last.get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        if (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT:
            return "llama-bpe"
    raise UsageError(
        f"{folder}: the tokenizer splits text in a way llama.cpp is not known to share "
        f"(pre-tokenizer {kinds}); it is not written to GGUF"
    )


def write_gguf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    gguf_type: str = "f16",
    source_run: str | os.PathLike | None = None,
) -> Path:
    """Convert a merged export or full fine-tune folder to GGUF at `out_path`; write its Modelfile.

    `source_run`: the run the folder was merged from, named in the file's metadata.
    """
    from gguf import GGUFWriter, LlamaFileType, TokenType

    from corral.models import quiet_transformers

    folder = Path(model_dir)
    out = Path(out_path)
    info = read_run_info(folder)
    _check_gguf_type(gguf_type)
    config = _read_config(folder)
    shape = _model_shape(config, folder)
    from transformers import AutoTokenizer, GenerationConfig

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        try:
            generation = GenerationConfig.from_pretrained(folder)
        except OSError:
            generation = None
    pre = _tokenizer_pre(tokenizer, folder)
    template = get_template(info.template, tokenizer)
    info.check_template(template, folder)
    # The folder's own chat template should already be the run's; rebuild it to be sure.
    carry_template_for_engines(tokenizer, template)
    tokens, token_types, merges = _vocabulary(tokenizer, shape["vocab_size"], TokenType, folder)
    plans = _plan_tensors(folder, config, gguf_type)

    writer = GGUFWriter(None, "llama")
    writer.add_type("model")
    writer.add_name(out.stem)
    if source_run is not None or info.merged_from:
        writer.add_description(f"corral export of {source_run or info.merged_from}")
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, info.base_model)
    file_type = {
        "f32": LlamaFileType.ALL_F32,
        "f16": LlamaFileType.MOSTLY_F16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]
    writer.add_file_type(int(file_type))
    if gguf_type == "q8_0":
        from gguf import GGML_QUANT_VERSION

        writer.add_quantization_version(GGML_QUANT_VERSION)
    for key, value in shape.items():
        full_key = f"llama.{key}"
        if isinstance(value, float):
            writer.add_float32(full_key, value)
        else:
            writer.add_uint32(full_key, int(value))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(int(token_id))
    # A one-token end marker other than EOS (a chat template's `<|eot_id|>`) ends turns too.
    others = [i for i in stop_token_ids(tokenizer, template) if i != tokenizer.eos_token_id]
    if generation is not None and not others:
        eos_ids = generation.eos_token_id
        eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
        others = [i for i in eos_ids if i is not None and i != tokenizer.eos_token_id]
    if others:
        writer.add_eot_token_id(int(others[0]))
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    for plan in plans:
        _add_tensor_info(writer, plan)

    with exclusive_output(out, what="GGUF file"):
        # Built in a folder beside OUT and renamed over it: OUT is either as before or complete.
        building = temporary_folder_beside(out)
        part = building / out.name
        try:
            writer.write_header_to_file(part)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for data in _tensor_data(folder, plans):
                writer.write_tensor_data(data)
            writer.close()
            with open(part, "rb") as written:
                os.fsync(written.fileno())
            os.replace(part, out)
        finally:
            writer.close()
            shutil.rmtree(building, ignore_errors=True)
    write_modelfile(out, template, tokenizer)
    return out


def _vocabulary(
    tokenizer: Any, vocab_size: int, token_type: Any, folder: Path
) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id (padded to the embedding's rows), their llama.cpp types, and the merges."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id: dict[int, str] = {index: token for token, index in spec["model"]["vocab"].items()}
    types: dict[int, int] = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = int(
            token_type.CONTROL if added.get("special") else token_type.USER_DEFINED
        )
    count = max(by_id) + 1
    if count > vocab_size:
        raise UsageError(
            f"{folder}: the tokenizer has {count} tokens but the model only {vocab_size} embeddings"
        )
    tokens, kinds = [], []
    for index in range(vocab_size):
        if index in by_id:
            tokens.append(by_id[index])
            kinds.append(types.get(index, int(token_type.NORMAL)))
        else:  # rows the embedding has and the tokenizer never produces
            tokens.append(f"[PAD{index}]")
            kinds.append(int(token_type.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, kinds, merges


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [folder / name for name in sorted(set(names))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise UsageError(f"{folder}: no model.safetensors; GGUF export reads safetensors weights")


def _tensor_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    from safetensors import safe_open

    shapes = {}
    for path in _weight_files(folder):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[key] = (tuple(handle.get_slice(key).get_shape()), path)
    return shapes


def _plan_tensors(folder: Path, config: dict[str, Any], gguf_type: str) -> list[_Plan]:
    from gguf import MODEL_ARCH, get_tensor_name_map

    blocks = config["num_hidden_layers"]
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, blocks)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    tied = config.get("tie_word_embeddings", False)
    plans = []
    for key, (shape, _) in sorted(_tensor_shapes(folder).items(), key=lambda kv: _order(kv[0])):
        if key == "lm_head.weight" and tied:
            continue  # readers reuse the embedding when the file has no output.weight
        if key.endswith("rotary_emb.inv_freq"):
            continue
        stem, _, suffix = key.rpartition(".")
        name = names.get_name(stem)
        if name is None or suffix != "weight":
            raise UsageError(f"{folder}: tensor {key} has no GGUF name for a LLaMA model")
        if len(shape) == 1 or gguf_type == "f32":
            kind = "f32"
        elif gguf_type == "q8_0" and shape[-1] % 32 == 0:
            kind = "q8_0"
        else:
            kind = "f16"
        permute = heads if stem.endswith("q_proj") else kv_heads if stem.endswith("k_proj") else 0
        plans.append(_Plan(key, f"{name}.{suffix}", shape, kind, permute))
    if not tied and not any(p.name == "output.weight" for p in plans):
        raise UsageError(f"{folder}: no lm_head.weight and the embeddings are not tied")
    return plans


def _order(key: str) -> tuple[int, int, str]:
    """Embedding first, then the blocks in order, then the final norm and the output."""
    parts = key.split(".")
    if "layers" in parts:
        return (1, int(parts[parts.index("layers") + 1]), key)
    return (0 if "embed_tokens" in key else 2, 0, key)


def _add_tensor_info(writer: Any, plan: _Plan) -> None:
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    if plan.kind == "q8_0":
        byte_shape = quant_shape_to_byte_shape(plan.shape, GGMLQuantizationType.Q8_0)
        writer.add_tensor_info(
            plan.name,
            byte_shape,
            np.dtype(np.uint8),
            int(np.prod(byte_shape)),
            raw_dtype=GGMLQuantizationType.Q8_0,
        )
        return
    dtype = np.dtype(np.float32 if plan.kind == "f32" else np.float16)
    writer.add_tensor_info(plan.name, plan.shape, dtype, int(np.prod(plan.shape)) * dtype.itemsize)


def _tensor_data(folder: Path, plans: list[_Plan]) -> Iterator[Any]:
    """Each planned tensor's bytes, in plan order, read one at a time."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants
    from safetensors import safe_open

    shapes = _tensor_shapes(folder)
    with ExitStack() as stack:
        handles = {
            path: stack.enter_context(safe_open(path, framework="pt"))
            for path in {path for _, path in shapes.values()}
        }
        for plan in plans:
            tensor = handles[shapes[plan.source][1]].get_tensor(plan.source)
            data = tensor.float().numpy()
            if plan.permute_heads:
                data = interleave_rotary_halves(data, plan.permute_heads)
            if plan.kind == "q8_0":
                yield quants.quantize(data, GGMLQuantizationType.Q8_0)
            elif plan.kind == "f16":
                yield data.astype(np.float16)
            else:
                yield np.ascontiguousarray(data, dtype=np.float32)


def interleave_rotary_halves(weight: Any, heads: int) -> Any:
    """A query/key projection in llama.cpp's layout: per head, the rotary pair (i, i + d/2) of
    transformers becomes the adjacent pair (2i, 2i + 1)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# --- the Ollama Modelfile ---------------------------------------------------------------------


def write_modelfile(gguf_path: Path, template: PromptTemplate, tokenizer: Any) -> Path:
    """`Modelfile` beside the GGUF: FROM it, the run's prompt format, and where answers stop."""
    lines = [
        f"# Ollama: ollama create NAME -f {MODELFILE_NAME}  (written by corral export; "
        f"template {template.name})",
        f"FROM ./{gguf_path.name}",
    ]
    go_template = ollama_template(template, tokenizer)
    if go_template is None:
        lines.append(
            "# No TEMPLATE: this chat template has no Ollama equivalent here; Ollama reads the "
            "one in the GGUF"
        )
    else:
        lines.append(f'TEMPLATE """{go_template}"""')
    stops = [template.end_marker]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops if stop]
    path = gguf_path.parent / MODELFILE_NAME
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def ollama_template(template: PromptTemplate, tokenizer: Any) -> str | None:
    """An Ollama (Go text/template) TEMPLATE rendering `template` as `format_conversation` does.

    Ollama gives `.Messages` (each with `.Role` and `.Content`) and generates after the rendered
    text, so the last user turn ends with the response marker. `chat`: a ChatML template when the
    tokenizer's chat template is ChatML, else None.
    """
    if template.name == "chat":
        return _chatml_template(tokenizer)
    turns = template.turns
    prefix, suffix = template.no_input.split("{instruction}")
    parts = []
    if turns.default_system:
        parts.append(
            '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
            + template.turns.system_prefix
            + turns.default_system
            + turns.system_suffix
            + "{{ end }}"
        )
    # `$previous` is the role of the message before, or "answered" after an assistant turn that
    # answered a user turn: the separator a message gets depends only on what came before it.
    parts.append(
        '{{ $previous := "" }}{{ range .Messages }}'
        + '{{ if and (eq $previous "user") (ne .Role "assistant") }}'
        + turns.after_unanswered
        + '{{ else if eq $previous "answered" }}'
        + turns.after_answer
        + "{{ end }}"
        + '{{ if eq .Role "system" }}'
        + turns.system_prefix
        + "{{ .Content }}"
        + turns.system_suffix
        + '{{ $previous = "system" }}'
        + '{{ else if eq .Role "user" }}'
        + prefix
        + "{{ .Content }}"
        + suffix
        + '{{ $previous = "user" }}'
        + '{{ else if and (eq .Role "assistant") (eq $previous "user") }}'
        + turns.answer_prefix
        + "{{ .Content }}"
        + template.completion_suffix
        + '{{ $previous = "answered" }}'
        + "{{ else }}{{ $previous = .Role }}{{ end }}{{ end }}"
    )
    return "".join(parts)


def _chatml(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def _chatml_template(tokenizer: Any) -> str | None:
    """The ChatML Go template, with the default system turn the tokenizer's template adds."""
    probe = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    generation = "<|im_start|>assistant\n"
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        alone = tokenizer.apply_chat_template(
            probe[1:2], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # noqa: BLE001 - any template error means: no equivalent
        return None
    expected = "".join(_chatml(m["role"], m["content"]) for m in probe) + generation
    user_turn = _chatml("user", "U") + generation
    if rendered != expected or not alone.endswith(user_turn):
        return None
    default = alone[: -len(user_turn)]
    head = (
        '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}' + default + "{{ end }}"
        if default
        else ""
    )
    return (
        head
        + "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        + generation
    )

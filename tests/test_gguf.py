"""`corral export --gguf`: a GGUF file that transformers (and so llama.cpp's readers) load back to
the merged model, logits and greedy answers included, with the run's chat template in its metadata
and an Ollama Modelfile beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.rundir import read_run_info

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Name a color.", "Give a synonym for quick.", "What is 2 + 3?"]


def corral(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        cwd=REPO,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def gguf_metadata(path: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    wanted = ("tokenizer.chat_template", "tokenizer.ggml.pre", "general.file_type")
    return {key: fields[key].contents() for key in wanted if key in fields}


def load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.models import quiet_transformers

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def load_folder(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.models import quiet_transformers

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def embedded_export(tmp_path_factory, embedded_model_path) -> tuple[Path, Path]:
    """An Alpaca-format LoRA run on the embedded model (random, small adapter weights, so the
    merge changes every attention projection), exported with --merge and --gguf (f32) at once."""
    from corral.training.gguf import export_gguf
    from model_runs import random_lora_run

    root = tmp_path_factory.mktemp("gguf-embedded")
    run = root / "runs" / "alpaca-lora"
    # A nudge, not noise (LoRA B scaled down): answers stay answers.
    random_lora_run(
        run,
        "embedded",
        embedded_model_path,
        template="alpaca",
        targets=("q_proj", "k_proj", "v_proj"),
        lora_b_scale=0.05,
    )
    merged = root / "models" / "merged"
    out = export_gguf(run, root / "models" / "mine.gguf", gguf_type="f32", merge_dir=merged)
    return merged, out


@pytest.fixture(scope="module")
def loaded_gguf(embedded_export):
    """The f32 GGUF as transformers loads it: (model, tokenizer), once for the module."""
    return load_gguf(embedded_export[1])


@pytest.mark.long
def test_the_f32_gguf_loads_back_to_the_merged_model(embedded_export, loaded_gguf):
    import torch

    merged, gguf_path = embedded_export
    assert read_run_info(merged).kind == "merged"
    reference, reference_tokenizer = load_folder(merged)
    model, tokenizer = loaded_gguf
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3
    texts = [
        "Below is an instruction that describes a task.\n\n### Instruction:\nName a color.",
        "Hello, world! 1234 <|im_start|>user\nhi<|im_end|>\n",
        "The quick brown fox jumps over the lazy dog.",
    ]
    worst = 0.0
    for text in texts:
        ids = reference_tokenizer(text)["input_ids"]
        assert tokenizer(text)["input_ids"] == ids
        with torch.no_grad():
            batch = torch.tensor([ids])
            difference = (model(batch).logits - reference(batch).logits).abs().max().item()
        worst = max(worst, difference)
    print(f"max |logits difference| f32 GGUF vs merged folder: {worst:.3g}")
    assert worst < 1e-4


@pytest.mark.long
def test_greedy_answers_from_the_gguf_equal_corral_infer(
    embedded_export, loaded_gguf, one_torch_thread
):
    from corral.inference.generation import answer_instructions
    from corral.inference.loading import LoadedModel

    from corral.templates import get_template

    merged, gguf_path = embedded_export
    model, tokenizer = loaded_gguf
    tokenizer.padding_side = "left"
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        template=get_template("alpaca", tokenizer),
        name="gguf",
        source="model",
        context_length=512,
        owns_model=False,  # the fixture's model, shared with the other tests here
    )
    from_gguf = answer_instructions(gguf_path, QUESTIONS, max_new_tokens=16, loaded=loaded)
    from_folder = answer_instructions(str(merged), QUESTIONS, max_new_tokens=16)
    assert [a.raw for a in from_gguf] == [a.raw for a in from_folder]
    assert all(a.raw for a in from_folder)


@pytest.mark.long
def test_the_gguf_carries_the_exports_chat_template_and_a_modelfile(embedded_export):
    from transformers import AutoTokenizer

    merged, gguf_path = embedded_export
    metadata = gguf_metadata(gguf_path)
    template = AutoTokenizer.from_pretrained(merged).chat_template
    assert metadata["tokenizer.chat_template"] == template
    assert "### Response:" in template
    assert (merged / "chat_template.jinja").read_text(encoding="utf-8") == template
    assert metadata["general.file_type"] == 0  # all f32
    modelfile = (gguf_path.parent / "Modelfile").read_text(encoding="utf-8").splitlines()
    assert "FROM ./mine.gguf" in modelfile
    # Alpaca's answers end with EOS, which is its end marker: one stop line.
    assert [line for line in modelfile if line.startswith("PARAMETER")] == [
        'PARAMETER stop "<|im_end|>"'
    ]
    text = "\n".join(modelfile)
    assert "### Instruction:\n{{ .Content }}\n\n### Response:\n" in text


@pytest.mark.slow  # `corral export --gguf` in a process: merge, convert, quantize
def test_the_cli_writes_a_quantized_gguf_of_an_adapter_run(lora_run, tmp_path):
    """Without --merge the run is merged in a temporary folder beside the output, then removed."""
    out_dir = tmp_path / "models"
    result = corral("export", str(lora_run), "--gguf", str(out_dir / "tiny.gguf"), "--gguf-type",
                    "q8_0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["Modelfile", "tiny.gguf"]
    assert gguf_metadata(out_dir / "tiny.gguf")["general.file_type"] == 7  # mostly q8_0
    modelfile = (out_dir / "Modelfile").read_text(encoding="utf-8")
    # Dolly's end marker spans tokens: a stop string, and EOS beside it.
    assert 'PARAMETER stop "### End"\nPARAMETER stop "<|im_end|>"\n' in modelfile


@pytest.mark.slow  # converts a merged export and runs both models
def test_an_f16_gguf_of_a_merged_export_is_close_to_it(lora_run, tmp_path):
    """A merged export (no adapter) is converted as it is."""
    import torch
    from corral.training.export import merge_run
    from corral.training.gguf import export_gguf

    merged = merge_run(lora_run, tmp_path / "merged")
    out = export_gguf(merged, tmp_path / "tiny16.gguf", gguf_type="f16")
    assert gguf_metadata(out)["general.file_type"] == 1  # mostly f16
    reference, tokenizer = load_folder(merged)
    model, _ = load_gguf(out)
    batch = torch.tensor([tokenizer("### Instruction:\nSay hello.")["input_ids"]])
    with torch.no_grad():
        difference = (model(batch).logits - reference(batch).logits).abs().max().item()
    assert difference < 1e-2


def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path, tiny_model_path):
    out = tmp_path / "out" / "x.gguf"
    result = corral("export", str(tmp_path), "--gguf", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("corral: error: ")
    assert "run_info.json" in lines[0]
    assert not out.parent.exists() or list(out.parent.iterdir()) == []

    result = corral("export", str(tmp_path))
    assert result.returncode == 2 and "--merge OUT, --gguf OUT.gguf" in result.stderr


def test_outputs_that_cannot_be_written_are_refused_before_any_work(lora_run, tmp_path):
    from corral.training.gguf import export_gguf

    from corral.errors import RunDirError, UsageError

    with pytest.raises(UsageError, match="must end with .gguf"):
        export_gguf(lora_run, tmp_path / "model.bin")
    with pytest.raises(UsageError, match="would overwrite the input"):
        export_gguf(lora_run, tmp_path / "x.gguf", merge_dir=lora_run)
    with pytest.raises(RunDirError, match="no such run directory"):
        export_gguf(tmp_path / "absent", tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_users_modelfile_an_existing_gguf_and_a_run_folder_are_never_written(lora_run, tmp_path):
    """As --merge refuses a non-empty folder: refused before any work, every file as it was."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "Modelfile").write_text("FROM llama3\nSYSTEM my own prompt\n")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.gguf").write_bytes(b"GGUF an older export")
    run_files = sorted(p.name for p in lora_run.iterdir())
    for out, named in (
        (mine / "new.gguf", "Modelfile: already exists"),
        (theirs / "model.gguf", "model.gguf: already exists"),
        (lora_run / "model.gguf", "holds a model (run_info.json)"),
    ):
        result = corral("export", str(lora_run), "--gguf", str(out))
        assert result.returncode == 2 and named in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (mine / "Modelfile").read_text() == "FROM llama3\nSYSTEM my own prompt\n"
    assert sorted(p.name for p in mine.iterdir()) == ["Modelfile"]
    assert (theirs / "model.gguf").read_bytes() == b"GGUF an older export"
    assert sorted(p.name for p in lora_run.iterdir()) == run_files


def test_query_and_key_rows_are_interleaved_as_llama_cpp_reads_them():
    import numpy as np
    from corral.training.gguf import interleave_rotary_halves
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of dim 8
    written = interleave_rotary_halves(weight, 2)
    assert written[:4, 0].tolist() == [0, 12, 3, 15]  # head 0: rows 0, 4, 1, 5
    processor = LlamaTensorProcessor({"num_attention_heads": 2, "num_key_value_heads": 2})
    assert np.array_equal(processor.process(written, "blk.0.attn_q.weight").weights, weight)

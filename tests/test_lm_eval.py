"""EleutherAI's lm-evaluation-harness through `corral serve` (the real lm-eval, in .venv-lmeval:
`make test-lm-eval`).

The same model folder is evaluated twice: by lm-eval's own transformers backend (`--model hf`, the
reference) and through Corral's server (`--model local-completions` for loglikelihood and
generation requests, `--model local-chat-completions` for chat). Two offline tasks over local JSON
files: a 4-choice multiple-choice task (loglikelihood requests: token-id prompts, echo, logprobs)
and a one-word question-answering task (generation until a newline).

What must hold: the same accuracy, the same greedy flags and texts sample by sample, and
log-likelihoods within 1e-3 (not bit-equal: the server scores the whole sequence in one batched
forward where the reference scores it without the last token, which moves float32 rounding by
about 1e-5 per token).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from servers import REPO, corral_serve

LM_EVAL = REPO / ".venv-lmeval" / "bin" / "lm_eval"
SERVED_NAME = "corral-embedded"
LOGLIKELIHOOD_TOLERANCE = 1e-3

# Hand-written items: questions a 135M instruct model answers partly right, so accuracy can differ.
MULTIPLE_CHOICE = [
    ("What is the capital of France?", ["Berlin", "Madrid", "Paris", "Rome"], 2),
    ("How many legs does a spider have?", ["Six", "Eight", "Ten", "Four"], 1),
    ("Which planet is known as the Red Planet?", ["Venus", "Jupiter", "Mercury", "Mars"], 3),
    ("What is the boiling point of water at sea level in degrees Celsius?", ["100", "50", "212", "0"], 0),
    ("Which animal is the largest mammal?", ["Elephant", "Blue whale", "Giraffe", "Horse"], 1),
    ("What gas do plants absorb from the air?", ["Oxygen", "Helium", "Carbon dioxide", "Nitrogen"], 2),
    ("How many days are in a week?", ["Five", "Six", "Seven", "Eight"], 2),
    ("What is the opposite of hot?", ["Cold", "Warm", "Loud", "Fast"], 0),
    ("Which color do you get by mixing blue and yellow?", ["Red", "Purple", "Orange", "Green"], 3),
    ("What is the largest ocean on Earth?", ["Atlantic Ocean", "Pacific Ocean", "Indian Ocean", "Arctic Ocean"], 1),
    ("Who wrote the play Romeo and Juliet?", ["Charles Dickens", "Mark Twain", "William Shakespeare", "Jane Austen"], 2),
    ("What is 7 times 8?", ["54", "56", "64", "48"], 1),
    ("Which organ pumps blood through the human body?", ["Heart", "Lungs", "Liver", "Brain"], 0),
    ("What do bees make?", ["Milk", "Silk", "Wax paper", "Honey"], 3),
    ("In which continent is Egypt?", ["Asia", "Africa", "Europe", "South America"], 1),
    ("What is frozen water called?", ["Steam", "Ice", "Fog", "Rain"], 1),
]  # fmt: skip
SHORT_ANSWERS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is two plus two?", "four"),
    ("What color is grass?", "green"),
    ("What is the opposite of up?", "down"),
    ("What animal says moo?", "cow"),
]

MC_TASK = """\
task: corral_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GEN_TASK = """\
task: corral_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Answer each question with one word.\\nQ: What color is the sky on a clear day?\\nA: blue\\nQ: {{{{question}}}}\\nA:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
metadata:
  version: 1.0
"""


def lm_eval_missing() -> str | None:
    if not LM_EVAL.is_file():
        return f"no lm-eval environment at {LM_EVAL.parent.parent} (build it: make lmeval-env)"
    return None


pytestmark = [
    pytest.mark.lm_eval,
    pytest.mark.skipif(lm_eval_missing() is not None, reason=lm_eval_missing() or ""),
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """The two task YAMLs and their data; lm-eval needs the data paths absolute."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, template, rows in (
        (
            "corral_mc",
            MC_TASK,
            [{"question": q, "choices": c, "answer": a} for q, c, a in MULTIPLE_CHOICE],
        ),
        ("corral_gen", GEN_TASK, [{"question": q, "answer": a} for q, a in SHORT_ANSWERS]),
    ):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{name}.yaml").write_text(template.format(data=data))
    return folder


def run_lm_eval(tasks: Path, output: Path, *args: str) -> tuple[dict, dict]:
    """Run lm_eval offline; return (aggregate results by task, samples by task and doc id)."""
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [str(LM_EVAL), *args, "--include_path", str(tasks), "--log_samples",
         "--output_path", str(output)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    results: dict = {}
    for path in output.rglob("results_*.json"):
        results.update(json.loads(path.read_text())["results"])
    samples: dict = {}
    for path in output.rglob("samples_*.jsonl"):
        task = path.name[len("samples_") :].rsplit("_", 1)[0]
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        samples[task] = {row["doc_id"]: row for row in rows}
    return results, samples


def choice_scores(sample: dict) -> list[tuple[float, bool]]:
    """A multiple-choice sample's (log-likelihood, is greedy) per choice (lm-eval logs strings)."""
    scores = []
    for (loglikelihood, greedy), *_ in sample["resps"]:
        scores.append((float(loglikelihood), str(greedy) == "True"))
    return scores


@pytest.fixture(scope="module")
def server(embedded_model_path):
    with corral_serve(
        ["--model", str(embedded_model_path), "--dtype", "float32",
         "--served-model-name", SERVED_NAME],
        timeout=300,
    ) as base:  # fmt: skip
        yield base


@pytest.fixture(scope="module")
def hf_reference(tasks, embedded_model_path, tmp_path_factory) -> tuple[dict, dict]:
    """lm-eval's own transformers backend on the embedded model folder: the reference."""
    return run_lm_eval(
        tasks, tmp_path_factory.mktemp("hf"),
        "--model", "hf", "--model_args", f"pretrained={embedded_model_path},dtype=float32",
        "--tasks", "corral_mc,corral_gen", "--device", "cpu", "--batch_size", "1",
    )  # fmt: skip


def test_local_completions_through_corral_serve_equal_lm_eval_hf(
    tasks, server, embedded_model_path, hf_reference, tmp_path
):
    folder = str(embedded_model_path)
    reference, reference_samples = hf_reference
    served, served_samples = run_lm_eval(
        tasks, tmp_path / "served",
        "--model", "local-completions",
        "--model_args",
        f"model={SERVED_NAME},base_url={server}/v1/completions,tokenizer={folder},"
        "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1",
        # Several token-id prompts in one request: the batched path of /v1/completions.
        "--tasks", "corral_mc,corral_gen", "--batch_size", "4",
    )  # fmt: skip

    for metric in ("acc,none", "acc_norm,none"):
        assert served["corral_mc"][metric] == reference["corral_mc"][metric], metric
    assert served["corral_gen"]["exact_match,none"] == reference["corral_gen"]["exact_match,none"]
    # Neither all right nor all wrong: a broken scorer could not hit the same value by chance.
    assert 0 < reference["corral_mc"]["acc,none"] < 1

    worst = 0.0
    for doc_id, expected in reference_samples["corral_mc"].items():
        got = served_samples["corral_mc"][doc_id]
        assert [g for _, g in choice_scores(got)] == [g for _, g in choice_scores(expected)], doc_id
        for (a, _), (b, _) in zip(choice_scores(got), choice_scores(expected), strict=True):
            worst = max(worst, abs(a - b))
    assert worst < LOGLIKELIHOOD_TOLERANCE, worst
    for doc_id, expected in reference_samples["corral_gen"].items():
        assert served_samples["corral_gen"][doc_id]["resps"] == expected["resps"], doc_id


def test_local_chat_completions_through_corral_serve_equal_lm_eval_hf(
    tasks, server, embedded_model_path, tmp_path
):
    """Generation with the model's chat template: lm-eval's hf backend renders it itself, the
    chat endpoint renders it in the server (the tokenizer's template: the served folder has one)."""
    reference, reference_samples = run_lm_eval(
        tasks, tmp_path / "hf",
        "--model", "hf", "--model_args", f"pretrained={embedded_model_path},dtype=float32",
        "--tasks", "corral_gen", "--apply_chat_template", "--device", "cpu", "--batch_size", "1",
    )  # fmt: skip
    served, served_samples = run_lm_eval(
        tasks, tmp_path / "served",
        "--model", "local-chat-completions",
        "--model_args",
        f"model={SERVED_NAME},base_url={server}/v1/chat/completions,num_concurrent=1,max_retries=1",
        "--tasks", "corral_gen", "--apply_chat_template",
    )  # fmt: skip
    assert served["corral_gen"]["exact_match,none"] == reference["corral_gen"]["exact_match,none"]
    texts = {d: s["resps"] for d, s in served_samples["corral_gen"].items()}
    assert texts == {d: s["resps"] for d, s in reference_samples["corral_gen"].items()}
    assert any(str(r).strip("[]' ") for r in texts.values())  # it generated something


@pytest.fixture(scope="module")
def random_adapter_run(tmp_path_factory, embedded_model_path) -> Path:
    """An adapter run directory on the embedded model whose LoRA weights are random (not zero)."""
    from model_runs import random_lora_run

    run = tmp_path_factory.mktemp("runs") / "random-lora"
    return random_lora_run(run, "embedded", embedded_model_path, template="alpaca")


def test_corral_eval_runs_harness_tasks_on_the_base_and_the_adapter_run(
    tasks, hf_reference, random_adapter_run, embedded_model_path, tmp_path
):
    import sys

    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli", "eval", "--base", str(embedded_model_path),
         "--tuned", str(random_adapter_run), "--lm-eval-tasks", "corral_mc",
         "--lm-eval-include", str(tasks), "--lm-eval", str(LM_EVAL), "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    section = json.loads(out.read_text())["lm_eval"]
    base, tuned = section["models"]["base"], section["models"]["tuned"]
    # The base through `corral eval` is lm-eval's hf backend on the same folder: the same numbers.
    reference = hf_reference[0]["corral_mc"]
    assert base["results"]["corral_mc"]["acc"] == reference["acc,none"]
    assert base["results"]["corral_mc"]["acc_norm"] == reference["acc_norm,none"]
    # The adapter run goes to lm-eval as peft on its recorded base, with the run's tokenizer.
    args = tuned["command"][tuned["command"].index("--model_args") + 1]
    assert f"pretrained={embedded_model_path}" in args
    assert f"peft={random_adapter_run.resolve()}" in args
    assert 0.0 <= tuned["results"]["corral_mc"]["acc"] <= 1.0
    table = result.stdout.splitlines()
    assert any(line.startswith("corral_mc") and "acc_norm" in line for line in table)

    from corral.evaluation.report import build_report

    assert "lm-evaluation-harness" in build_report([out])

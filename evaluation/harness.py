"""`corral eval --lm-eval-tasks`: EleutherAI's lm-evaluation-harness on the base and the tuned model.

lm-eval runs as its own program (`lm_eval`, the `hf` backend), not imported: it pins packages
that Corral's environment has newer (its table writer wants python-dateutil<3), so it usually
lives in an environment of its own (`make lmeval-env` builds `.venv-lmeval`). Found as
`--lm-eval PATH`, else `$CORRAL_LM_EVAL`, else `lm_eval` on PATH, else `.venv-lmeval/bin/lm_eval`
beside this checkout.

Each model is given as lm-eval's hf backend takes it: a plain folder, hub id or merged export as
`pretrained=`; an adapter run as its base (`pretrained=`) with the run as `peft=`, and the run's
tokenizer (which carries the chat template of the run's own prompt format, for
`--apply_chat_template`). Tasks are lm-eval's names, or YAMLs in `--lm-eval-include` folders
(offline tasks over local files).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from corral.errors import UsageError
from corral.models import resolve_model
from corral.rundir import has_run_info, read_run_info

LM_EVAL_ENV = "CORRAL_LM_EVAL"
_CHECKOUT_ENV = Path(__file__).resolve().parents[1] / ".venv-lmeval" / "bin" / "lm_eval"


def find_lm_eval(explicit: str | None = None) -> str:
    """The `lm_eval` executable to run, or a UsageError saying how to get one."""
    for candidate in (explicit, os.environ.get(LM_EVAL_ENV)):
        if candidate:
            if not (Path(candidate).is_file() and os.access(candidate, os.X_OK)):
                raise UsageError(f"{candidate}: not an executable lm_eval")
            return candidate
    on_path = shutil.which("lm_eval")
    if on_path:
        return on_path
    if _CHECKOUT_ENV.is_file():
        return str(_CHECKOUT_ENV)
    raise UsageError(
        "lm-evaluation-harness not found: install it (pip install 'lm-eval[hf]', or make "
        f"lmeval-env for its own environment), or give --lm-eval PATH / ${LM_EVAL_ENV}"
    )


def model_args(model: str) -> tuple[str, str]:
    """(lm-eval's hf `--model_args`, a description) for a Corral model, run or export."""

    if has_run_info(model):
        info = read_run_info(model)
        if info.kind == "adapter":
            base = resolve_model(info.base_model_location())
            folder = Path(model).resolve()
            return (
                f"pretrained={base},peft={folder},tokenizer={folder}",
                f"{model} (adapter on {info.base_model})",
            )
        if info.kind == "reward":
            raise UsageError(f"{model}: a reward model scores answers; lm-eval evaluates LMs")
        return f"pretrained={Path(model).resolve()}", f"{model} ({info.kind})"
    return f"pretrained={resolve_model(model)}", model


def lm_eval_command(
    executable: str,
    model: str,
    tasks: str,
    output: Path,
    *,
    include: list[str] | None = None,
    limit: int | None = None,
    batch_size: str = "1",
    chat_template: bool = False,
    device: str | None = None,
) -> list[str]:
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    args, _ = model_args(model)
    command = [
        executable, "--model", "hf", "--model_args", args, "--tasks", tasks,
        "--device", device, "--batch_size", batch_size, "--output_path", str(output),
    ]  # fmt: skip
    for folder in include or ():
        command += ["--include_path", str(Path(folder).resolve())]
    if limit is not None:
        command += ["--limit", str(limit)]
    if chat_template:
        command.append("--apply_chat_template")
    return command


def read_results(output: Path) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results_*.json (standard errors and aliases left out)."""
    results: dict[str, dict[str, float]] = {}
    for path in sorted(output.rglob("results_*.json")):
        for task, metrics in json.loads(path.read_text())["results"].items():
            results[task] = {
                name.removesuffix(",none"): value
                for name, value in metrics.items()
                if isinstance(value, int | float) and "stderr" not in name
            }
    return results


def run_harness(
    models: dict[str, str],
    tasks: str,
    *,
    executable: str | None = None,
    include: list[str] | None = None,
    limit: int | None = None,
    batch_size: str = "1",
    chat_template: bool = False,
) -> dict[str, Any]:
    """Run lm-eval once per model (role -> model); the results by role, with each command."""
    lm_eval = find_lm_eval(executable)
    for folder in include or ():
        if not Path(folder).is_dir():
            raise UsageError(f"--lm-eval-include {folder}: no such folder")
    section: dict[str, Any] = {"tasks": tasks, "limit": limit, "models": {}}
    for role, model in models.items():
        with tempfile.TemporaryDirectory(prefix=f"corral-lm-eval-{role}-") as scratch:
            command = lm_eval_command(
                lm_eval, model, tasks, Path(scratch), include=include, limit=limit,
                batch_size=batch_size, chat_template=chat_template,
            )  # fmt: skip
            print(f"lm-eval ({role}): {' '.join(command)}", flush=True)
            # lm-eval's own progress and tables go to the terminal; failures end the command.
            completed = subprocess.run(command)
            if completed.returncode != 0:
                raise UsageError(
                    f"lm-eval failed on {role} ({model}) with exit code {completed.returncode}; "
                    "its messages are above"
                )
            results = read_results(Path(scratch))
        if not results:
            raise UsageError(f"lm-eval wrote no results for {role} ({model})")
        section["models"][role] = {
            "model": model_args(model)[1],
            "command": command,
            "results": results,
        }
    return section


def harness_rows(section: dict[str, Any]) -> list[tuple[str, str, list[float | None]]]:
    """(task, metric, one value per model or None) for every task and metric of the first model,
    in order: the rows of the printed table and of the report's."""
    models = list(section["models"].values())
    first = models[0].get("results", {})
    return [
        (task, metric, [m.get("results", {}).get(task, {}).get(metric) for m in models])
        for task in sorted(first)
        for metric in sorted(first[task])
    ]


def format_harness_table(section: dict[str, Any]) -> str:
    """One row per task and metric, one column per model."""
    roles = list(section["models"])
    header = f"{'lm-eval task':<24} {'metric':<16}" + "".join(f" {r:>10}" for r in roles)
    lines = [header]
    for task, metric, values in harness_rows(section):
        cells = "".join(f" {'-' if v is None else f'{v:.4f}':>10}" for v in values)
        lines.append(f"{task:<24} {metric:<16}{cells}")
    return "\n".join(lines)

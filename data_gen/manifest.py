"""The files of a generation run beside its output, and the manifest's one format. Pure.

For `--output x.json` a run writes `x.json` (the Alpaca records), `x.journal.jsonl` (the crash-safe
journal) and `x.manifest.json`:

    {"version", "mode", "output", "journal", "seed_tasks": {path, count, sha256_16},
     "teacher": {kind, model, ...},
     "counts": {instructions, records, candidates, dropped: {reason: n}, classification_instructions},
     "requests", "retries", "failed_requests", "request_errors": {error: n},
     "tokens": {prompt, completion}, "cost_usd", "duration_s", "resumed", "config": {...},
     "estimate": {requests|prompt_tokens|completion_tokens|wall_seconds|cost_usd:
                  {estimated, actual}}   (only when `--estimate` ran before)}

`corral report` reads it through `read_manifest`, so the reader and the writer share one format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1


def run_paths(output: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(alpaca json, journal, manifest) for an output path: `x.json`, `x.journal.jsonl`, `x.manifest.json`."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix else output
    return output, Path(f"{stem}.journal.jsonl"), Path(f"{stem}.manifest.json")


def estimate_path(output: str | os.PathLike) -> Path:
    """`x.estimate.json`: what `corral generate --estimate` predicted for `x.json`."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix else output
    return Path(f"{stem}.estimate.json")


def read_estimate(output: str | os.PathLike) -> dict[str, Any] | None:
    path = estimate_path(output)
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def build_manifest(
    *,
    mode: str,
    output: Path,
    journal: Path,
    seed_tasks: dict[str, Any],
    teacher: dict[str, Any],
    tasks: list[dict[str, Any]],
    records: int,
    candidates: int,
    drops: dict[str, int],
    teacher_stats: dict[str, Any],
    duration_s: float,
    resumed: bool,
    config: dict[str, Any],
    estimate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a finished run (the format in the module docstring); with an estimate made
    beforehand, its figures stand beside the actual ones."""
    manifest = {
        "version": MANIFEST_VERSION,
        "mode": mode,
        "output": str(output),
        "journal": str(journal),
        "seed_tasks": seed_tasks,
        "teacher": teacher,
        "counts": {
            "instructions": len(tasks),
            "records": records,
            "candidates": candidates,
            "dropped": dict(sorted(drops.items())),
            "classification_instructions": sum(1 for t in tasks if t.get("is_classification")),
        },
        "requests": teacher_stats.get("requests", 0),
        "retries": teacher_stats.get("retries", 0),
        "failed_requests": teacher_stats.get("failed_requests", 0),
        "request_errors": teacher_stats.get("errors", {}),
        "tokens": {
            "prompt": teacher_stats.get("prompt_tokens", 0),
            "completion": teacher_stats.get("completion_tokens", 0),
        },
        "cost_usd": round(float(teacher_stats.get("cost_usd", 0.0)), 6),
        "duration_s": round(duration_s, 2),
        "resumed": resumed,
        "config": config,
    }
    if estimate is not None:
        manifest["estimate"] = {
            key: {"estimated": estimate.get(key), "actual": actual}
            for key, actual in (
                ("requests", manifest["requests"]),
                ("prompt_tokens", manifest["tokens"]["prompt"]),
                ("completion_tokens", manifest["tokens"]["completion"]),
                ("wall_seconds", manifest["duration_s"]),
                ("cost_usd", manifest["cost_usd"]),
            )
        }
    return manifest


def read_manifest(data_path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest a generation run wrote beside `data_path`; None for data made elsewhere."""
    path = run_paths(data_path)[2]
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return None
    return manifest


def drops_by_reason(manifest: dict[str, Any]) -> dict[str, int]:
    """Dropped candidates per filter reason."""
    return dict(manifest["counts"]["dropped"])


def seed_tasks_path(manifest: dict[str, Any]) -> Path | None:
    """The seed-task file the run used, while it still exists."""
    path = manifest["seed_tasks"]["path"]
    return Path(path) if Path(path).is_file() else None

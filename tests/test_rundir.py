"""The run-directory contract (corral/rundir.py): write, read, validate; pure, milliseconds."""

from __future__ import annotations

import json

import pytest

from corral.errors import RunDirError
from corral.rundir import (
    RUN_INFO_FILE,
    has_run_info,
    read_metrics,
    read_run_info,
    run_info_for_training,
    write_run_info,
)
from corral.templates import dolly_template


def _weights(path):
    """A real (tiny) safetensors file."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"weight": np.arange(6, dtype=np.float32)}, str(path))


def _adapter_run(folder, method="lora"):
    info = run_info_for_training(
        base_model="tiny-random",
        base_model_path="/nowhere/tiny",
        method=method,
        template=dolly_template(),
        max_length=256,
        corral_version="0.1.0",
    )
    write_run_info(folder, info)
    if info.kind == "adapter":
        (folder / "adapter_config.json").write_text("{}")
        _weights(folder / "adapter_model.safetensors")
    else:
        (folder / "config.json").write_text("{}")
        _weights(folder / "model.safetensors")
    return info


def test_round_trip_keeps_every_field_and_unknown_keys(tmp_path):
    info = _adapter_run(tmp_path)
    data = json.loads((tmp_path / RUN_INFO_FILE).read_text())
    data["written_by_a_newer_version"] = {"x": 1}
    (tmp_path / RUN_INFO_FILE).write_text(json.dumps(data))
    read = read_run_info(tmp_path)
    assert (read.kind, read.method, read.template) == ("adapter", "lora", "dolly")
    assert (read.response_marker, read.end_marker) == ("### Response:", "### End")
    assert read.extra == {"written_by_a_newer_version": {"x": 1}}
    assert read.to_dict() == {**info.to_dict(), "written_by_a_newer_version": {"x": 1}}
    assert has_run_info(tmp_path)


@pytest.mark.parametrize(
    ("method", "kind"), [("lora", "adapter"), ("qlora", "adapter"), ("full", "full")]
)
def test_kind_follows_the_method(tmp_path, method, kind):
    _adapter_run(tmp_path, method=method)
    assert read_run_info(tmp_path).kind == kind


def test_merged_export_records_its_source_and_needs_model_weights(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    merged = _adapter_run(run).merged(run)
    out = tmp_path / "merged"
    out.mkdir()
    write_run_info(out, merged)
    with pytest.raises(RunDirError, match="config.json of the merged export is missing"):
        read_run_info(out)
    (out / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match="no \\*.safetensors weights of the merged export"):
        read_run_info(out)
    _weights(out / "model.safetensors")
    read = read_run_info(out)
    assert (read.kind, read.method, read.template) == ("merged", "lora", "dolly")
    assert read.merged_from == str(run.resolve())


def test_records_from_before_kind_existed_are_understood(tmp_path):
    """Early merged exports said method 'merged'; early runs had no kind at all."""
    (tmp_path / "config.json").write_text("{}")
    _weights(tmp_path / "model.safetensors")
    (tmp_path / RUN_INFO_FILE).write_text(
        json.dumps({"base_model": "x", "method": "merged", "template": "alpaca"})
    )
    assert read_run_info(tmp_path).kind == "merged"
    (tmp_path / RUN_INFO_FILE).write_text(
        json.dumps({"base_model": "x", "method": "full", "template": "alpaca"})
    )
    assert read_run_info(tmp_path).kind == "full"


def test_an_unfinished_adapter_run_is_named(tmp_path):
    _adapter_run(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(
        RunDirError, match="adapter_model.safetensors is missing; did the run finish"
    ):
        read_run_info(tmp_path)
    assert read_run_info(tmp_path, check_files=False).kind == "adapter"


@pytest.mark.parametrize("keep", [4, 40, -3])
def test_truncated_weights_are_named_before_any_loader_sees_them(tmp_path, keep):
    _adapter_run(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:keep])
    with pytest.raises(RunDirError, match="adapter_model.safetensors: (truncated|not a whole)"):
        read_run_info(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "run_info.json: missing"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"base_model": "tiny-random", "method": "lora"}), "field 'template'"),
        (
            json.dumps({"base_model": "x", "method": "lora", "template": "wizard"}),
            "unknown template 'wizard'",
        ),
        (json.dumps({"base_model": "x", "method": "sft", "template": "dolly"}), "field 'method'"),
        (
            json.dumps({"base_model": "x", "method": "lora", "template": "dolly", "kind": "gguf"}),
            "field 'kind'",
        ),
    ],
)
def test_bad_run_info_names_the_file_and_field(tmp_path, content, message):
    if content is not None:
        (tmp_path / RUN_INFO_FILE).write_text(content)
    with pytest.raises(RunDirError, match=message) as error:
        read_run_info(tmp_path)
    assert str(tmp_path / RUN_INFO_FILE) in str(error.value)


def test_not_a_folder(tmp_path):
    with pytest.raises(RunDirError, match="no such run directory"):
        read_run_info(tmp_path / "absent")


def test_template_drift_is_refused(tmp_path):
    info = _adapter_run(tmp_path)
    changed = dolly_template().__class__(
        name="dolly", response_marker="### Response:", end_marker="### Finish", completion_suffix=""
    )
    info.check_template(dolly_template(), tmp_path)  # the same markers pass
    with pytest.raises(RunDirError, match="field 'end_marker'.*'### End'.*'### Finish'"):
        info.check_template(changed, tmp_path)


def test_metrics_name_a_bad_line(tmp_path):
    assert read_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2,\n')
    from corral.errors import RecordError

    with pytest.raises(RecordError, match=r"metrics.jsonl: line 3: invalid JSON"):
        read_metrics(tmp_path)

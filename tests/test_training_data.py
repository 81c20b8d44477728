"""Tokenization, label masking, truncation, splits and batch plans (no model needed)."""

from __future__ import annotations

import json

import pytest
from corral.training.data import (
    IGNORE_INDEX,
    load_records,
    mask_prompt_tokens,
    plan_batches,
    shard_for_process,
    split_validation,
    tokenize_record,
    tokenize_records,
)

from corral.errors import RecordError
from corral.templates import get_template

RECORD = {"instruction": "Name a primary color.", "input": "", "output": "Red."}
RECORD_WITH_INPUT = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."}


def trained_text(tokenizer, example) -> str:
    """The text of exactly the tokens that carry loss."""
    ids = [label for label in example.labels if label != IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_mask_prompt_tokens_masks_prompt_only():
    input_ids, labels = mask_prompt_tokens([5, 6, 7], [8, 9])
    assert input_ids == [5, 6, 7, 8, 9]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9]
    _, labels = mask_prompt_tokens([5, 6, 7], [8, 9], train_on_inputs=True)
    assert labels == [5, 6, 7, 8, 9]


@pytest.mark.parametrize(
    ("template_name", "expected_suffix"),
    [("alpaca", "<|im_end|>"), ("dolly", "\n\n### End"), ("chat", "<|im_end|>")],
)
@pytest.mark.parametrize("record", [RECORD, RECORD_WITH_INPUT])
def test_exactly_the_answer_and_end_marker_carry_loss(
    embedded_tokenizer, template_name, expected_suffix, record
):
    template = get_template(template_name, embedded_tokenizer)
    example, status = tokenize_record(record, 0, embedded_tokenizer, template, max_length=512)
    assert status == "kept"
    prompt = template.format_prompt(record["instruction"], record["input"])
    prompt_len = len(
        embedded_tokenizer(prompt, add_special_tokens=template.name != "chat").input_ids
    )
    # Every prompt token is masked, every later token is trained.
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    assert trained_text(embedded_tokenizer, example) == record["output"] + expected_suffix
    # The model sees exactly the prompt, then the answer: nothing added or lost at the seam.
    assert (
        embedded_tokenizer.decode(example.input_ids) == prompt + record["output"] + expected_suffix
    )


def test_end_marker_is_eos_and_never_the_pad(embedded_tokenizer):
    template = get_template("alpaca", embedded_tokenizer)
    example, _ = tokenize_record(RECORD, 0, embedded_tokenizer, template, max_length=512)
    assert example.labels[-1] == embedded_tokenizer.eos_token_id
    assert embedded_tokenizer.pad_token_id != embedded_tokenizer.eos_token_id


def test_train_on_inputs_trains_every_token(embedded_tokenizer):
    template = get_template("dolly", embedded_tokenizer)
    example, _ = tokenize_record(
        RECORD_WITH_INPUT, 0, embedded_tokenizer, template, max_length=512, train_on_inputs=True
    )
    assert example.labels == example.input_ids


def test_truncation_policies_are_counted(embedded_tokenizer):
    template = get_template("alpaca", embedded_tokenizer)
    long = {"instruction": "Repeat the word.", "input": "", "output": "word " * 200}
    records = [RECORD, long]
    examples, report = tokenize_records(records, embedded_tokenizer, template, max_length=80)
    assert [e.index for e in examples] == [0]
    assert (report.kept, report.dropped_too_long, report.truncated) == (1, 1, 0)
    examples, report = tokenize_records(
        records, embedded_tokenizer, template, max_length=80, truncation="truncate"
    )
    assert (report.kept, report.dropped_too_long, report.truncated) == (2, 0, 1)
    assert len(examples[1]) == 80
    assert examples[1].labels[-1] != IGNORE_INDEX  # the cut answer is still trained


def test_every_example_too_long_names_file_record_and_field(embedded_tokenizer):
    template = get_template("alpaca", embedded_tokenizer)
    with pytest.raises(RecordError) as error:
        tokenize_records([RECORD], embedded_tokenizer, template, max_length=8, source="d.json")
    message = str(error.value)
    assert "d.json" in message and "record 0" in message and "field 'output'" in message
    assert "max_length=8" in message


def test_bad_files_name_file_record_and_field(tmp_path):
    missing = tmp_path / "missing_field.json"
    missing.write_text(json.dumps([RECORD, {"instruction": "x", "input": ""}]))
    with pytest.raises(RecordError, match=r"missing_field.json: record 1: field 'output'"):
        load_records(str(missing))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(RECORD) + "\n{not json\n")
    with pytest.raises(RecordError, match=r"broken.jsonl: line 2: invalid JSON"):
        load_records(str(broken))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(RecordError, match="empty.json: no records"):
        load_records(str(empty))
    with pytest.raises(RecordError, match="file not found"):
        load_records(str(tmp_path / "nope.json"))


def test_datasets_folder_is_read(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list([RECORD, RECORD_WITH_INPUT]).save_to_disk(str(folder))
    assert load_records(str(folder)) == [RECORD, RECORD_WITH_INPUT]


def test_validation_split_is_seeded_and_disjoint():
    records = [{"instruction": f"task {i}", "input": "", "output": "x"} for i in range(50)]
    train, val = split_validation(records, 0.2, seed=1)
    assert len(val) == 10 and len(train) == 40
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in val)
    assert split_validation(records, 0.2, seed=1) == (train, val)
    assert split_validation(records, 0.2, seed=2)[1] != val
    assert len(split_validation(records, 7, seed=1)[1]) == 7
    with pytest.raises(RecordError):
        split_validation(records, 50, seed=1)


def test_batch_plan_covers_every_example_and_groups_lengths():
    lengths = [(i * 37) % 200 + 5 for i in range(256)]
    grouped = plan_batches(lengths, 8, seed=0, epoch=0)
    random_order = plan_batches(lengths, 8, seed=0, epoch=0, group_by_length=False)
    for plan in (grouped, random_order):
        assert sorted(i for batch in plan for i in batch) == list(range(256))

    def padding(plan):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plan)

    assert padding(grouped) < padding(random_order) / 3
    assert (
        plan_batches(lengths, 8, seed=0, epoch=0) == grouped
    )  # deterministic: resume relies on it
    assert plan_batches(lengths, 8, seed=0, epoch=1) != grouped


def test_shards_are_equal_whole_steps_and_disjoint():
    batches = [[i] for i in range(23)]
    shards = [
        shard_for_process(batches, num_processes=2, process_index=r, per_step=3) for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 9  # 23 batches -> 3 steps of 3 x 2 processes
    assert not {b[0] for b in shards[0]} & {b[0] for b in shards[1]}

"""Packing isolates examples, and the completion-only loss equals the textbook full-logits loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from corral.training.batches import (
    collate_packed,
    collate_padded,
    completion_loss_sum,
    pack_into_rows,
)
from corral.training.data import IGNORE_INDEX, TokenizedExample


@pytest.fixture(scope="module")
def tiny_model(tiny_model_path):
    from corral.models import load_model

    model = load_model(str(tiny_model_path), dtype=torch.float32)
    model.eval()
    return model


def make_examples() -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for index, (prompt_len, answer_len) in enumerate([(5, 3), (9, 6), (2, 1), (7, 4)]):
        ids = torch.randint(10, 1000, (prompt_len + answer_len,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
        examples.append(TokenizedExample(input_ids=ids, labels=labels, index=index))
    return examples


@pytest.mark.parametrize("row_capacity", [None, 16])
def test_packed_examples_cannot_see_each_other(tiny_model, row_capacity):
    examples = make_examples()
    packed = collate_packed(examples, row_capacity=row_capacity, pad_token_id=0)
    assert packed["attention_mask"] is None
    rows = pack_into_rows([len(e) for e in examples], row_capacity or 10_000)
    assert len(rows) == (1 if row_capacity is None else 3)
    assert packed["input_ids"].shape == (
        len(rows),
        max(sum(len(examples[i]) for i in r) for r in rows),
    )
    with torch.no_grad():
        # use_cache=False as in training: transformers derives the block-diagonal mask from the
        # position ids only when no cache is in play.
        packed_logits = tiny_model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        for r, row in enumerate(rows):
            offset = 0
            for i in row:
                alone = tiny_model(input_ids=torch.tensor([examples[i].input_ids])).logits[0]
                torch.testing.assert_close(
                    packed_logits[r, offset : offset + len(examples[i])], alone
                )
                offset += len(examples[i])


def test_packed_targets_never_cross_examples():
    examples = make_examples()
    packed = collate_packed(examples)  # one row
    targets = packed["targets"][0].tolist()
    (row,) = pack_into_rows([len(e) for e in examples], 10_000)
    ends = torch.tensor([len(examples[i]) for i in row]).cumsum(0) - 1
    assert all(targets[end] == IGNORE_INDEX for end in ends.tolist())
    assert packed["num_tokens"] == sum(len(e) for e in examples)


@pytest.mark.parametrize("packing", [False, True])
def test_completion_loss_matches_full_logits_cross_entropy(tiny_model, packing):
    examples = make_examples()
    if packing:
        batch = collate_packed(examples, row_capacity=16, pad_token_id=0)
    else:
        batch = collate_padded(examples, pad_token_id=0)
    loss_sum, n = completion_loss_sum(tiny_model, batch, "cpu")
    assert n == sum(e.num_label_tokens for e in examples)
    # Reference: every example alone, all logits, shifted labels, the usual mean.
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = tiny_model(input_ids=torch.tensor([example.input_ids])).logits[0]
            labels = torch.tensor(example.labels[1:])
            total += F.cross_entropy(
                logits[:-1], labels, reduction="sum", ignore_index=IGNORE_INDEX
            )
            count += int((labels != IGNORE_INDEX).sum())
    assert n == count
    torch.testing.assert_close(loss_sum.detach(), torch.as_tensor(total), rtol=1e-4, atol=1e-3)


def test_padding_is_not_a_target_and_eos_is():
    eos, pad = 2, 0
    example = TokenizedExample(
        input_ids=[5, 6, 7, eos], labels=[IGNORE_INDEX, IGNORE_INDEX, 7, eos], index=0
    )
    longer = TokenizedExample(input_ids=[5] * 7, labels=[IGNORE_INDEX] * 3 + [5] * 4, index=1)
    batch = collate_padded([example, longer], pad_token_id=pad)
    assert batch["input_ids"][0].tolist() == [5, 6, 7, eos, pad, pad, pad]
    assert batch["targets"][0].tolist() == [IGNORE_INDEX, 7, eos] + [IGNORE_INDEX] * 4
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0]

"""Tensors for the model: padded or packed micro-batches, and the completion-only loss.

Two things make training cheap here:
- length grouping (see data.plan_batches) keeps padding small; packing goes further and puts
  several examples in one row: the position ids restart at 0 for each example and no 2-D
  attention mask is passed, which makes transformers build a block-diagonal causal mask from the
  position ids (examples never attend to each other);
- logits are computed only where a label is trained (`logits_to_keep` with a boolean mask), so the
  vocabulary projection and the fp32 cross-entropy skip every prompt and padding position.

Every batch also says which example each token belongs to (`example_ids`, -1 for padding), so
per-sequence sums (the log-probabilities DPO compares, training/preference.py) work on padded and
packed batches alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from corral.training.data import IGNORE_INDEX, TokenizedExample


def next_token_targets(labels: Sequence[int]) -> list[int]:
    """Targets aligned with inputs: position t learns token t+1; the last position learns nothing."""
    return [*labels[1:], IGNORE_INDEX]


def collate_padded(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, Any]:
    """A right-padded batch [B, T] with an attention mask; padding is never a target."""
    width = max(len(example) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    example_ids = torch.full((len(examples), width), -1, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        targets[row, :n] = torch.tensor(next_token_targets(example.labels))
        attention_mask[row, :n] = 1
        example_ids[row, :n] = row
    positions = torch.arange(width).unsqueeze(0).expand(len(examples), -1).contiguous()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": positions,
        "targets": targets,
        "example_ids": example_ids,
        "num_tokens": sum(len(example) for example in examples),
    }


def pack_into_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example positions into rows of at most `capacity` tokens (first fit, longest first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_packed(
    examples: Sequence[TokenizedExample], *, row_capacity: int | None = None, pad_token_id: int = 0
) -> dict[str, Any]:
    """Examples concatenated into rows of at most `row_capacity` tokens, with no cross-attention.

    Each example's position ids restart at 0 and no 2-D mask is given, so attention is
    block-diagonal. A row shorter than the widest is filled with a pad segment that has its own
    positions (so it is a separate block) and no targets. One row per micro-batch
    (`row_capacity=None`) suits kernels with variable-length attention (flash attention); with SDPA
    the attention cost grows with the square of the row, so rows of max_length suit it better.
    """
    capacity = row_capacity or sum(len(example) for example in examples)
    rows = pack_into_rows([len(example) for example in examples], capacity)
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    input_ids: list[list[int]] = []
    targets: list[list[int]] = []
    positions: list[list[int]] = []
    owners: list[list[int]] = []
    for row in rows:
        row_ids: list[int] = []
        row_targets: list[int] = []
        row_positions: list[int] = []
        row_owners: list[int] = []
        for i in row:
            example = examples[i]
            row_ids.extend(example.input_ids)
            # Shifted per example: an example's last token never learns the next one's first.
            row_targets.extend(next_token_targets(example.labels))
            row_positions.extend(range(len(example)))
            row_owners.extend([i] * len(example))
        fill = width - len(row_ids)
        row_ids.extend([pad_token_id] * fill)
        row_targets.extend([IGNORE_INDEX] * fill)
        row_positions.extend(range(fill))
        row_owners.extend([-1] * fill)
        input_ids.append(row_ids)
        targets.append(row_targets)
        positions.append(row_positions)
        owners.append(row_owners)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "attention_mask": None,
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "example_ids": torch.tensor(owners, dtype=torch.long),
        "num_tokens": sum(len(example) for example in examples),
    }


def collate(
    examples: Sequence[TokenizedExample],
    *,
    packing: bool,
    pad_token_id: int,
    row_capacity: int | None = None,
) -> dict[str, Any]:
    if packing:
        return collate_packed(examples, row_capacity=row_capacity, pad_token_id=pad_token_id)
    return collate_padded(examples, pad_token_id)


def trained_logits(model: Any, batch: dict[str, Any], device: Any) -> tuple[Any, Any, Any]:
    """(logits [trained tokens, vocab], their targets, the boolean mask of trained positions).

    One forward pass that projects onto the vocabulary only where a label is trained.
    """
    targets = batch["targets"].to(device)
    keep = targets != IGNORE_INDEX
    outputs = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=None
        if batch["attention_mask"] is None
        else batch["attention_mask"].to(device),
        position_ids=batch["position_ids"].to(device),
        logits_to_keep=keep,
        use_cache=False,
    )
    return outputs.logits, targets[keep], keep  # only the rows that carry loss


def completion_loss_sum(model: Any, batch: dict[str, Any], device: Any) -> tuple[Any, int]:
    """(sum of cross-entropy over trained tokens, number of trained tokens) for one micro-batch."""
    logits, targets, keep = trained_logits(model, batch, device)
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss_sum, int(keep.sum())

"""Choosing the next token: greedy or sampled per request, with OpenAI's logit adjustments, and
the log-probabilities reported for chosen tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from corral.inference.params import SamplingParams

# (logprob of the chosen token, {token id: logprob} of the likeliest alternatives)
TokenLogprob = tuple[float, dict[int, float]]


def token_logprobs(
    logits: torch.Tensor, chosen: Sequence[int], alternatives: int
) -> list[TokenLogprob]:
    """(logprob of the chosen token, {id: logprob} of the `alternatives` likeliest and the chosen
    one) for each row of `logits` [tokens, vocab], from one fp32 log-softmax: a greedy token's
    logprob is then exactly the largest of its alternatives (clients compare them with ==)."""
    log_probs = logits.float().log_softmax(dim=-1)
    chosen_ids = torch.tensor(chosen, device=log_probs.device)
    picked = log_probs.gather(1, chosen_ids[:, None])[:, 0].tolist()
    if alternatives > 0:
        values, ids = log_probs.topk(alternatives, dim=-1)
        values, ids = values.tolist(), ids.tolist()
    else:
        values = ids = [[] for _ in chosen]
    found = []
    for token, logprob, top_ids, top_values in zip(chosen, picked, ids, values, strict=True):
        top = dict(zip(top_ids, top_values, strict=True))
        top[token] = logprob
        found.append((logprob, top))
    return found


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    histories: Sequence[Sequence[int]] = (),
    prompts: Sequence[Sequence[int]] = (),
) -> list[int]:
    """One token per row: greedy rows take the argmax, the others sample with their own settings.

    `histories` (tokens generated so far per row) feed the presence and frequency penalties; the
    repetition penalty also counts the row's prompt (`prompts`), as transformers does.
    """
    tokens = logits.argmax(dim=-1).tolist()
    for row, row_params in enumerate(params):
        row_logits = logits[row]
        if row_params.adjusts_logits:
            row_logits = _adjust_logits(
                row_logits,
                row_params,
                histories[row] if histories else (),
                prompts[row] if prompts else (),
            )
            tokens[row] = int(row_logits.argmax())
        if row_params.greedy:
            continue
        scores = row_logits / row_params.temperature
        if row_params.top_k > 0 and row_params.top_k < scores.shape[0]:
            kth = torch.topk(scores, row_params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if row_params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            # Keep the smallest set whose probability reaches top_p (always the best token).
            drop = cumulative - sorted_scores.softmax(dim=-1) >= row_params.top_p
            scores = scores.scatter(0, order[drop], float("-inf"))
        probabilities = scores.softmax(dim=-1)
        tokens[row] = int(torch.multinomial(probabilities.cpu(), 1, generator=generators[row]))
    return tokens


def _adjust_logits(
    logits: torch.Tensor, params: SamplingParams, history: Sequence[int], prompt: Sequence[int] = ()
) -> torch.Tensor:
    logits = logits.clone()
    vocab = logits.shape[0]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*prompt, *history}), dtype=torch.long, device=logits.device)
        seen = seen[seen < vocab]
        picked = logits[seen]
        logits[seen] = torch.where(
            picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
        )
    for token_id, bias in params.logit_bias.items():
        if 0 <= token_id < vocab:
            logits[token_id] += bias
    if history and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(history, dtype=torch.long), minlength=vocab)[:vocab]
        counts = counts.to(logits.device, logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(
            logits.dtype
        )
    return logits

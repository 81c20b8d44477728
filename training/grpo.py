"""GRPO's arithmetic (Shao et al. 2024) and its variants, on tensors alone: no model, no data.

One rollout gives each prompt `num_generations` completions (a group) and each completion a
scalar reward. The advantage of a completion is its reward against its group's:

    A_i = r_i - mean(group)                         scale_rewards=none   (Dr. GRPO)
    A_i = (r_i - mean(group)) / (std(group) + 1e-4)  scale_rewards=group  (the GRPO paper)
    A_i = (r_i - mean(group)) / (std(batch) + 1e-4)  scale_rewards=batch

(std with Bessel's correction, as TRL computes it). Every token of a completion carries its
completion's advantage. With per-token log-probabilities under the policy being trained (logp),
the policy that sampled the rollout (old; equal to logp on the first update of a rollout) and,
when beta > 0, the reference policy (ref):

    ratio = exp(logp - old)
    loss_t = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * kl_t
    kl_t = ratio * (exp(ref - logp) - (ref - logp) - 1)

(kl_t: Schulman's k3 estimator, >= 0, weighted by the ratio so that its gradient is the reverse
KL's on every update of a rollout, as DeepSeek-V3.2 and TRL's default do.)

The loss types differ only in how token losses become one number (their length normalisation):

- `grpo`: the mean over each completion's tokens, then the mean over completions (the paper;
  favours short correct and long wrong answers, the bias Dr. GRPO names);
- `dr_grpo`: the sum over all tokens / (completions x max_completion_length): a constant, so no
  length bias (Liu et al. 2025);
- `dapo`: the sum over all tokens / the tokens of the whole step (Yu et al. 2025; TRL's default);
- `bnpo`: the token mean of each forward pass, averaged over forward passes.

`mask_truncated_completions` drops completions that hit max_completion_length from the loss (DAPO's
overlong filtering): a cut-off answer's reward says little about its tokens.

`loss_terms` returns (sum, units) per forward pass so a step over several forward passes and
processes divides the summed terms by the step's summed units, as the training loop does for
SFT tokens. `tests/test_grpo.py` checks advantages, loss, gradient and metrics against TRL's own
GRPOTrainer code on a fixed batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
ScaleRewards = Literal["group", "batch", "none"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
STD_FLOOR = (
    1e-4  # added to the std before dividing, as TRL does: a group of equal rewards gives A = 0
)


def reward_std(values: torch.Tensor) -> torch.Tensor:
    """Standard deviation with Bessel's correction (NaN for a single value)."""
    return values.std() if values.numel() > 1 else values.new_tensor(float("nan"))


@dataclass
class Advantages:
    """Per-completion advantages of one rollout and what describes them."""

    values: torch.Tensor  # [completions], the groups contiguous
    std: torch.Tensor  # [completions]: the std each one was scaled by (its group's or the batch's)

    @property
    def zero_std_share(self) -> float:
        """Share of completions whose group (or batch) had equal rewards: no learning signal."""
        return float(torch.isclose(self.std, torch.zeros_like(self.std)).float().mean())


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: ScaleRewards = "group"
) -> Advantages:
    """Advantages of `rewards` [prompts x num_generations], each group's completions contiguous."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if num_generations < 2:
        raise ValueError(f"num_generations must be at least 2, got {num_generations}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards are not whole groups of {num_generations}")
    rewards = rewards.float()
    groups = rewards.view(-1, num_generations)
    means = groups.mean(dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = reward_std(rewards).expand_as(rewards)
    else:  # "none" still measures the group std, to report groups without signal
        std = groups.std(dim=1).repeat_interleave(num_generations)
    advantages = rewards - means
    if scale_rewards != "none":
        advantages = advantages / (std + STD_FLOOR)
    return Advantages(values=advantages, std=std)


def token_logps_and_entropy(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each token, entropy of each distribution) under logits / temperature.

    The policy is the distribution the rollout sampled from, so its log-probabilities are taken
    after the same temperature (as TRL does). logits [..., vocab], token_ids [...].
    """
    log_probs = (logits.float() / temperature).log_softmax(dim=-1)
    picked = log_probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return picked, entropy


@dataclass
class PolicyLoss:
    """The per-token terms of one forward pass (shapes [completions, tokens])."""

    per_token_loss: torch.Tensor
    ratio: torch.Tensor  # exp(logp - old), the importance ratio
    kl: torch.Tensor | None  # k3 per token, when beta > 0


def per_token_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> PolicyLoss:
    """The clipped surrogate (+ beta x k3 KL) of every token; see the module docstring.

    `old_logps` None: the first update of a rollout, where the sampling policy is the current one
    (ratio 1, its gradient that of logp). advantages: [completions].
    """
    old = logps.detach() if old_logps is None else old_logps
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    per_completion = advantages.unsqueeze(1)
    loss = -torch.min(ratio * per_completion, clipped * per_completion)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference policy's log-probabilities")
        delta = ref_logps - logps
        # Weighted by the importance ratio, the k3 term's gradient is that of the reverse KL even
        # on later updates of a rollout (DeepSeek-V3.2; TRL's use_bias_correction_kl default).
        kl = (torch.exp(delta) - delta - 1) * ratio
        loss = loss + beta * kl
    return PolicyLoss(per_token_loss=loss, ratio=ratio, kl=kl)


def loss_terms(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: LossType,
    *,
    max_completion_length: int,
) -> tuple[torch.Tensor, float]:
    """(loss sum, units) of one forward pass: the step's loss is sum of sums / sum of units.

    mask [completions, tokens]: 1 on completion tokens that count (not padding, not a masked
    truncated completion).
    """
    mask = mask.to(per_token_loss.dtype)
    completions = per_token_loss.shape[0]
    if loss_type == "grpo":
        per_completion = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_completion.sum(), float(completions)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum(), float(completions * max_completion_length)
    if loss_type == "dapo":
        return (per_token_loss * mask).sum(), float(mask.sum())
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0), 1.0
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def truncation_mask(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """`mask` with the rows of truncated completions zeroed (mask_truncated_completions)."""
    return mask * (~truncated.bool()).unsqueeze(1).to(mask.dtype)


def token_metric_sums(
    terms: PolicyLoss,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    entropy: torch.Tensor | None = None,
) -> dict[str, float]:
    """Sums over counted tokens, named as TRL logs them once divided by `tokens`:
    clip_ratio/low_mean (ratio below 1 - epsilon where A < 0), clip_ratio/high_mean (above
    1 + epsilon_high where A > 0), clip_ratio/region_mean (either), kl, entropy."""
    high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.float()
    ratio = terms.ratio.detach()
    per_completion = advantages.unsqueeze(1)
    low = (ratio < 1 - epsilon) & (per_completion < 0)
    above = (ratio > 1 + high) & (per_completion > 0)
    sums = {
        "tokens": float(mask.sum()),
        "clip_ratio/low_mean": float((low.float() * mask).sum()),
        "clip_ratio/high_mean": float((above.float() * mask).sum()),
        "clip_ratio/region_mean": float(((low | above).float() * mask).sum()),
        "kl": 0.0 if terms.kl is None else float((terms.kl.detach() * mask).sum()),
    }
    if entropy is not None:
        sums["entropy"] = float((entropy.detach().float() * mask).sum())
    return sums

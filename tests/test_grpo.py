"""GRPO's advantages, loss, gradient and metrics equal TRL's own computation on a fixed batch.

TRL computes them inside two methods of `GRPOTrainer` and offers no function for either, so these
tests build the real trainer (TRL's GRPOConfig defaults, the tiny random LLaMA) and call its real
methods, replacing only what would make the batch random:

- advantages: `_generate_and_score_completions` runs as TRL ships it (tokenising the prompts,
  decoding, the truncation mask, the reward call, the group statistics); only the sampler
  (`_generate_single_turn`) is replaced by fixed completion ids, and the reward function reads the
  fixed reward of each completion from a dataset column;
- loss: `_compute_loss` runs as TRL ships it; only the forward pass
  (`_get_per_token_logps_and_entropies`) returns fixed log-probabilities, so both sides see the
  same numbers and their losses, gradients and metrics can be compared to 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from corral.training.grpo import (  # noqa: E402
    group_advantages,
    loss_terms,
    per_token_policy_loss,
    token_logps_and_entropy,
    token_metric_sums,
    truncation_mask,
)

NUM_GENERATIONS = 4
MAX_COMPLETION_LENGTH = 6
PROMPTS = ["Add 2 and 3.", "Reverse the word cat.", "Name a colour."]
# Rewards per completion, groups of four: mixed, one all-equal group (no signal), and ties.
REWARDS = [1.0, 0.0, 0.5, 1.0, 0.2, 0.2, 0.2, 0.2, 3.0, -1.0, 0.0, 0.0]


def fixed_completions(eos: int) -> list[list[int]]:
    """Completion ids of varied lengths: some end with EOS, some stop at the length limit
    (truncated), none contains padding inside."""
    generator = torch.Generator().manual_seed(7)
    completions = []
    for index in range(len(REWARDS)):
        truncated = index % 3 == 0
        length = MAX_COMPLETION_LENGTH if truncated else 1 + index % (MAX_COMPLETION_LENGTH - 1)
        ids = torch.randint(100, 5000, (length,), generator=generator).tolist()
        if not truncated:
            ids[-1] = eos
        completions.append(ids)
    return completions


@pytest.fixture(scope="module")
def trl_trainer(tiny_model_path, tmp_path_factory):
    """A real GRPOTrainer on the tiny random LLaMA, with its sampler replaced by fixed ids."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from corral.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("tiny-random")
    model = load_model("tiny-random", dtype=torch.float32, tokenizer=tokenizer)
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        per_device_train_batch_size=len(REWARDS),
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION_LENGTH,
        report_to=[],
        use_cpu=True,
    )

    def fixed_reward(prompts, completions, reward, **fields):
        return list(reward)

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[fixed_reward],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        processing_class=tokenizer,
    )
    completions = fixed_completions(tokenizer.eos_token_id)
    trainer._generate_single_turn = lambda prompt_ids, *rest: (completions, None)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    yield trainer
    # TRL's trainer set accelerate's process-wide state (its own mixed precision); Corral's runs
    # later in this process build their Accelerator from a clean one, as a new process would.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def trl_rollout(trainer, scale_rewards: str, mask_truncated: bool) -> dict:
    trainer.scale_rewards = scale_rewards
    trainer.beta = 0.0  # the reference log-probabilities are given to the loss, not computed here
    trainer.mask_truncated_completions = mask_truncated
    inputs = [
        {"prompt": PROMPTS[i // NUM_GENERATIONS], "reward": reward}
        for i, reward in enumerate(REWARDS)
    ]
    return trainer._generate_and_score_completions(inputs)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trls(trl_trainer, scale_rewards):
    expected = trl_rollout(trl_trainer, scale_rewards, mask_truncated=False)["advantages"]
    found = group_advantages(torch.tensor(REWARDS), NUM_GENERATIONS, scale_rewards)
    torch.testing.assert_close(found.values, expected.float(), atol=1e-5, rtol=0)
    # The all-equal group carries no signal: advantage 0, and a third of completions say so.
    assert found.values[4:8].abs().max() < 1e-6
    if scale_rewards != "batch":
        zero_std = trl_trainer._metrics["train"]["frac_reward_zero_std"][-1]
        assert found.zero_std_share == pytest.approx(zero_std, abs=1e-6)
        assert found.zero_std_share == pytest.approx(1 / 3)


def test_truncated_completions_are_masked_as_trl_masks_them(trl_trainer):
    rollout = trl_rollout(trl_trainer, "group", mask_truncated=True)
    completions = fixed_completions(trl_trainer.processing_class.eos_token_id)
    lengths = torch.tensor([len(c) for c in completions])
    mask = (torch.arange(rollout["completion_mask"].shape[1])[None] < lengths[:, None]).long()
    truncated = torch.tensor([i % 3 == 0 for i in range(len(completions))])
    found = truncation_mask(mask, truncated)
    assert torch.equal(found, rollout["completion_mask"].cpu())
    assert found[0].sum() == 0 and found[1].sum() == lengths[1]


def fixed_logps(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Policy, sampling-policy and reference log-probabilities per completion token: the policy
    moved away from the sampler by up to +-0.5 in log space, so some ratios leave [0.8, 1.28]."""
    generator = torch.Generator().manual_seed(3)
    shape = mask.shape
    policy = -3 * torch.rand(shape, generator=generator)
    old = policy + (torch.rand(shape, generator=generator) - 0.5)
    ref = policy + 0.6 * (torch.rand(shape, generator=generator) - 0.5)
    entropy = 2 * torch.rand(shape, generator=generator)
    return {"policy": policy, "old": old, "ref": ref, "entropy": entropy}


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize(
    ("beta", "with_old", "epsilon_high", "mask_truncated"),
    [
        (0.0, False, None, False),  # the first update of a rollout: ratio 1
        (0.0, True, 0.28, False),  # a later update, DAPO's asymmetric clip
        (0.04, True, None, True),  # KL to the reference, truncated completions masked
    ],
)
def test_loss_gradient_and_metrics_equal_trls(
    trl_trainer, loss_type, beta, with_old, epsilon_high, mask_truncated
):
    rollout = trl_rollout(trl_trainer, "group", mask_truncated=mask_truncated)
    mask = rollout["completion_mask"].cpu()
    logps = fixed_logps(mask)
    advantages = rollout["advantages"].cpu()

    trl_policy = logps["policy"].clone().requires_grad_(True)
    inputs = dict(rollout)
    if with_old:
        inputs["old_per_token_logps"] = logps["old"]
    if beta:
        inputs["ref_per_token_logps"] = logps["ref"]
    trl_trainer.loss_type, trl_trainer.beta = loss_type, beta
    trl_trainer.epsilon_low = 0.2
    trl_trainer.epsilon_high = 0.2 if epsilon_high is None else epsilon_high
    trl_trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (
        trl_policy,
        logps["entropy"],
        None,
    )
    trl_trainer._metrics["train"].clear()
    expected = trl_trainer._compute_loss(trl_trainer.model, inputs)
    expected.backward()

    policy = logps["policy"].clone().requires_grad_(True)
    terms = per_token_policy_loss(
        policy,
        logps["old"] if with_old else None,
        advantages,
        epsilon=0.2,
        epsilon_high=epsilon_high,
        beta=beta,
        ref_logps=logps["ref"] if beta else None,
    )
    loss_sum, units = loss_terms(
        terms.per_token_loss, mask, loss_type, max_completion_length=MAX_COMPLETION_LENGTH
    )
    loss = loss_sum / units
    loss.backward()

    assert abs(loss.item() - expected.item()) < 1e-5
    torch.testing.assert_close(policy.grad, trl_policy.grad, atol=1e-6, rtol=1e-5)
    sums = token_metric_sums(
        terms, advantages, mask, epsilon=0.2, epsilon_high=epsilon_high, entropy=logps["entropy"]
    )
    logged = trl_trainer._metrics["train"]
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy"]
    names += ["kl"] if beta else []
    for name in names:
        assert sums[name] / sums["tokens"] == pytest.approx(logged[name][-1], abs=1e-5), name
    if with_old:
        assert sums["clip_ratio/region_mean"] > 0  # the batch does exercise clipping


def test_loss_types_differ_in_length_normalisation_only():
    """One long and one short completion with equal per-token loss: grpo weighs them equally per
    completion, dapo per token, dr_grpo by a constant."""
    per_token = torch.ones(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    found = {
        kind: loss_terms(per_token, mask, kind, max_completion_length=8)
        for kind in ("grpo", "dr_grpo", "dapo", "bnpo")
    }
    assert found["grpo"][0].item() == 2.0 and found["grpo"][1] == 2.0
    assert found["dr_grpo"][0].item() == 5.0 and found["dr_grpo"][1] == 16.0
    assert found["dapo"][0].item() == 5.0 and found["dapo"][1] == 5.0
    assert found["bnpo"][0].item() == 1.0 and found["bnpo"][1] == 1.0


def test_token_logps_follow_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    ids = torch.tensor([[0]])
    cold, _ = token_logps_and_entropy(logits, ids, temperature=0.5)
    plain, entropy = token_logps_and_entropy(logits, ids)
    assert cold.item() == pytest.approx(torch.log_softmax(logits / 0.5, -1)[0, 0, 0].item())
    assert cold.item() > plain.item()
    probabilities = logits.softmax(-1)
    assert entropy.item() == pytest.approx(-(probabilities * probabilities.log()).sum().item())


def test_group_advantages_refuse_what_is_not_a_group():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.zeros(5), 2)


def test_processes_roll_out_distinct_prompts_and_an_epoch_covers_every_prompt():
    from corral.training.grpo_objective import prompts_for_rollout

    def plan(rollout, process):
        return prompts_for_rollout(
            12, seed=3, rollout=rollout, per_process=3, world=2, process=process
        )

    first_epoch = [i for rollout in (0, 1) for process in (0, 1) for i in plan(rollout, process)]
    assert sorted(first_epoch) == list(range(12))  # 2 rollouts x 2 processes x 3 = one epoch
    assert plan(0, 0) == plan(0, 0) and set(plan(0, 0)).isdisjoint(plan(0, 1))
    assert sorted(plan(2, 0) + plan(2, 1) + plan(3, 0) + plan(3, 1)) == list(range(12))
    assert plan(2, 0) != plan(0, 0)  # the next epoch is another order


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss_type=sigmoid"], "'sigmoid' is not a loss of method grpo"),
        (["num_generations=3"], "must hold whole groups of 3"),
        (["reward_funcs=[]"], "needs a reward"),
        (["beta=-0.1"], "key 'beta': must be 0 or more"),
        (["temperature=0"], "key 'temperature'"),
        (["weights=full"], "trains lora or qlora weights"),
    ],
)
def test_grpo_config_errors_name_the_key(overrides, message):
    from corral.training.config import TrainConfig

    from corral.config import load_config
    from corral.errors import ConfigError

    preset = Path(__file__).parents[1] / "configs" / "training" / "grpo_smoke.yaml"
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, preset, overrides)


def test_beta_and_loss_type_default_per_method():
    from corral.training.config import TrainConfig

    from corral.config import load_config

    grpo = load_config(
        TrainConfig, None, ["method=grpo", "reward_funcs=[final_number]", "num_generations=4"]
    )
    dpo = load_config(TrainConfig, None, ["method=dpo"])
    assert (grpo.beta, grpo.loss_type) == (0.0, "dapo")
    assert (dpo.beta, dpo.loss_type) == (0.1, "sigmoid")

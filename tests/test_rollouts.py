"""Rollouts come from Corral's engine on the policy's live weights: no copy, no packing, the
template's rendering, seeded sampling, truncation flagged, train mode restored."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from corral.training.rollouts import completion_examples, generate_rollout  # noqa: E402

RECORDS = [{"prompt": "Name a colour.", "answer": "red"}, {"prompt": "Say hello.", "answer": "hi"}]


@pytest.fixture()
def policy(tiny_model_path):
    """A peft LoRA policy on the tiny random LLaMA, in train mode as the loop holds it."""
    from peft import LoraConfig, get_peft_model

    from corral.models import load_model, load_tokenizer
    from corral.templates import get_template

    tokenizer = load_tokenizer("tiny-random")
    base = load_model("tiny-random", dtype=torch.float32, tokenizer=tokenizer)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    return model, tokenizer, get_template("alpaca", tokenizer)


def roll(model, tokenizer, template, **overrides):
    settings = {"num_generations": 3, "max_completion_length": 6, "temperature": 1.0, "seed": 5}
    return generate_rollout(model, tokenizer, template, RECORDS, **{**settings, **overrides})


def test_a_rollout_samples_groups_from_the_rendered_prompt_and_restores_train_mode(policy):
    from corral.templates import encode_prompt

    model, tokenizer, template = policy
    rollout = roll(model, tokenizer, template)
    assert model.training
    assert len(rollout) == 6 and rollout.records == [RECORDS[0]] * 3 + [RECORDS[1]] * 3
    rendered = encode_prompt(tokenizer, template, template.format_prompt("Name a colour."))
    assert rollout.prompt_ids[0] == rendered
    # A random model rarely stops within 6 tokens: those completions are flagged truncated.
    for ids, cut in zip(rollout.completion_ids, rollout.truncated, strict=True):
        assert cut == (len(ids) == 6 and ids[-1] != tokenizer.eos_token_id)
    assert any(rollout.truncated)
    # Seeded per completion: the same rollout again, other completions within a group.
    again = roll(model, tokenizer, template)
    assert again.completion_ids == rollout.completion_ids
    assert len({tuple(ids) for ids in rollout.completion_ids[:3]}) > 1
    assert roll(model, tokenizer, template, step=1).completion_ids != rollout.completion_ids
    examples = completion_examples(rollout)
    assert examples[0].input_ids == rendered + rollout.completion_ids[0]
    assert examples[0].labels[: len(rendered)] == [-100] * len(rendered)


def test_rollouts_follow_the_adapter_as_it_trains(policy):
    """No copy of the weights: changing the LoRA weights in place changes the next rollout, and
    the engine leaves the peft layers unpacked and trainable."""
    model, tokenizer, template = policy
    greedy = {"temperature": 0.0, "num_generations": 2}
    before = roll(model, tokenizer, template, **greedy).completion_ids
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 5.0)
    after = roll(model, tokenizer, template, **greedy).completion_ids
    assert after != before
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(type(p) is torch.nn.Parameter for p in trainable)
    assert not any(type(m).__name__ == "PackedLinear" for m in model.modules())

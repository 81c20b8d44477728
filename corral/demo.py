"""`corral demo`: Corral end to end on the embedded model, on this machine.

At this stage it loads the embedded model and answers one instruction through the Alpaca
template; each stage adds its step (generate, then train, then compare base and tuned answers).
"""

from __future__ import annotations

import argparse
import time

DEMO_INSTRUCTION = "Give three tips for staying healthy."


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded", help="base model (default: embedded)")
    parser.add_argument("--instruction", default=DEMO_INSTRUCTION, help="the instruction to answer")
    parser.add_argument(
        "--max-new-tokens", type=int, default=96, help="answer length limit in tokens"
    )


def answer_once(model_name: str, instruction: str, max_new_tokens: int) -> str:
    """Greedy answer to one instruction through the Alpaca template, prompt stripped."""
    import torch

    from corral.models import load_model, load_tokenizer, quiet_transformers
    from corral.templates import get_template

    with quiet_transformers():
        tokenizer = load_tokenizer(model_name)
        model = load_model(model_name, dtype=torch.float32, tokenizer=tokenizer)
    model.eval()
    template = get_template("alpaca", tokenizer)
    prompt = template.format_prompt(instruction)
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.convert_tokens_to_ids(template.end_marker),
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = generated[0, encoded["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def run_demo(args: argparse.Namespace) -> int:
    from corral.models import resolve_model

    started = time.monotonic()
    print(f"[1/1] loading {args.model} ({resolve_model(args.model)})")
    answer = answer_once(args.model, args.instruction, args.max_new_tokens)
    print(f"\n### Instruction:\n{args.instruction}\n\n### Response:\n{answer}\n")
    print(f"done in {time.monotonic() - started:.1f} s")
    return 0

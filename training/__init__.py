"""Stage 2: fine-tune a LLaMA-family model on Alpaca JSON (LoRA, QLoRA, full) under accelerate."""

"""Stage 1: seed tasks to Alpaca JSON with a teacher LLM (Self-Instruct, Stanford Alpaca)."""

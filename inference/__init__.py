"""Stage 3: response extraction, batched generation, chat and an OpenAI-compatible server."""

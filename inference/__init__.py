"""Stage 3: response extraction, batched generation, chat and an OpenAI-compatible server.

- `extraction.py`  Dolly-style answer extraction, incremental detokenization, stop strings (pure)
- `params.py`      `SamplingParams`: temperature, top_p, top_k, stops, seed, penalties (pure)
- `loading.py`     load a base model, a run directory (base + adapter, its template) or a merged model
- `engine.py`      continuous batching over a shared KV cache; sync `generate`, threaded `submit`
- `generation.py`  prompts from the template, `answer_instructions`, `compare_base_and_tuned`
- `batch.py`       `corral infer`: answer an Alpaca file, resumable through a partial file
- `chat.py`        `corral chat`: a streaming terminal chat
- `server.py`      `corral serve`: the OpenAI-compatible FastAPI app and its error shapes
- `serve_config.py` the serve settings (configs/serve/*.yaml)
- `web/index.html` the chat page served at `/`
- `commands.py`    the CLI subcommands (light imports only)
"""

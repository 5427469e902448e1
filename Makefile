# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=
# Extra demo flags, e.g. config overrides: make demo ARGS="--config.trainer.total_steps=5"
ARGS ?=

.PHONY: demo test install install-test clean bench accelerator-checks

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(TEST_STAMP): $(STAMP) requirements-test.txt requirements-test-nodeps.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/nodeps -r requirements-test-nodeps.txt
	touch $@

install: $(STAMP)
install-test: $(TEST_STAMP)

demo: $(STAMP)
	$(PY) -m dapo_jax.demo --workdir $(WORKDIR) $(ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest -n 2 -ra --durations=15 $(PYTEST_ARGS) tests

bench: $(TEST_STAMP)
	$(PY) -m benchmarks.model_step
	$(PY) -m benchmarks.rollout_throughput --presets tiny,qwen2.5-0.5b --batches 16,64

# On a GPU/TPU host: the accelerator checks of issues 15 and 16 in one budgeted run.
accelerator-checks: $(STAMP)
	$(PY) -m benchmarks.accelerator_checks --out workdir/accelerator_checks

clean:
	rm -rf $(VENV) workdir .pytest_cache

# The two commands of the README: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup demo test lint app

# torch is installed first, by pip, and pinned here so that this machine's local CPU build is used (pip reads
# the machine's configuration); the package itself only asks for a lower bound, so users elsewhere keep their own
# torch. The rest goes through uv, which installs and compiles in parallel (about 40 s instead of 70 s for the
# demo's set-up); uv does not read pip's configuration (a mirror, a certificate), so where it cannot be installed
# or fails, pip does the same install. The demo needs only the package and its `demo` extra; the tests and the
# app add theirs (gradio, playwright, faiss).
UV_INSTALL := $(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode

$(VENV)/.installed-demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet uv && $(UV_INSTALL) -e ".[demo]" || $(BIN)/pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.installed: $(VENV)/.installed-demo
	$(UV_INSTALL) -e ".[test,demo,app]" || $(BIN)/pip install --quiet -e ".[test,demo,app]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q

# The main job: pretrain on the synthetic world, evaluate, save, report (ARGS="--scale 2 --seed 1 ...").
demo: $(VENV)/.installed-demo
	$(BIN)/python -m albef_hf.demo $(ARGS)

# The interactive page of the demo's saved model (ARGS="--port 7861 --gallery-size 300 ..."), on 127.0.0.1.
DEMO_MODEL := outputs/demo/model
app: setup
	@test -f $(DEMO_MODEL)/config.json || { echo "no demo model in $(DEMO_MODEL): run 'make demo' first (about 6 minutes)"; exit 1; }
	$(BIN)/python -m albef_hf.app --model $(DEMO_MODEL) $(ARGS)

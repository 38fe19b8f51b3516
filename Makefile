# recaption — `make recaption` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARDS := data/shards
CORPUS := data/corpus
TRAIN_STEPS ?= 600

.PHONY: setup browser recaption train ablation test lint format schemas dist bench bench-openai bench-lens clean

setup: $(STAMP)

# Re-installs only when the project's dependencies change; otherwise a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,ocr,samples,train,local,download]'
	touch $(STAMP)

recaption: setup
	$(BIN)/recaption samples $(SHARDS)
	$(BIN)/recaption run --pipeline default --input $(SHARDS) --output $(CORPUS)
	$(BIN)/recaption report $(CORPUS)

# The bundled Lens trainer on the corpus `make recaption` wrote (made first if missing).
train: setup
	test -f $(CORPUS)/manifest.json || $(MAKE) recaption
	$(BIN)/recaption lens train --corpus $(CORPUS) --config cpu --steps $(TRAIN_STEPS) --out runs/lens-cpu

# Dense captions vs alt text, offline on a CPU (38 min measured on 2 cores, fresh clone): scenes, analyzer captions,
# four training arms (dense and alt on two seeds), evaluation in four prompt styles
# -> runs/ablation/report.md, results.json (stages already done are skipped)
ablation: setup
	$(BIN)/python -m recaption.ablation --out runs/ablation

test: setup browser
	$(BIN)/python -m pytest -q

# Debian's Chromium and ChromeDriver, for the report's test in a real browser (as root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "make browser: run as root, or apt-get install chromium chromium-driver; the browser test skips without them"; \
	fi

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

schemas: setup
	$(BIN)/recaption schemas schemas

# The sdist and the wheel users install (the bundled pipelines inside), in build/dist/.
dist: setup
	$(BIN)/python -m build --outdir build/dist .

bench: setup
	$(BIN)/python bench/pipeline_bench.py

# ~12 minutes: quota use, 429s and a 429 storm against the loopback test server
bench-openai: setup
	$(BIN)/python bench/openai_bench.py

# ~25 minutes: the ablation's corpus, the trainer before and after the CPU fixes for 10 minutes
# each, prompt following at 2, 5 and 10 minutes (MINUTES=2 for a shorter run)
MINUTES ?= 10
bench-lens: setup
	$(BIN)/python bench/lens_bench.py --minutes $(MINUTES)

clean:
	rm -rf data/corpus data/shards .pytest_cache

# Two entry points a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-postgres test-scale lint format bench clean

# llama-cpp-python has no wheel for this platform: pip compiles it (8-12 min once; pip's wheel
# cache makes later installs take seconds). The multimodal library is not needed, so skip it.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/lowtide models install
	touch $(STAMP)

install: $(STAMP)

## Start Lowtide on its embedded defaults at http://127.0.0.1:8080/v1
run: $(STAMP)
	$(BIN)/lowtide serve --host 127.0.0.1 --port 8080 --data-dir ./lowtide-data

## Lint, check the import contracts (pyproject.toml), then the whole test suite
test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

## The integration suite again, every server on PostgreSQL (a fresh database each)
TEST_DATABASE_URL ?= postgresql://postgres@127.0.0.1
test-postgres: $(STAMP)
	LOWTIDE_TEST_DATABASE_URL=$(TEST_DATABASE_URL) $(BIN)/python -m pytest -q

## The integration suite on PostgreSQL + an S3-compatible server (moto, started for the run)
test-scale: $(STAMP)
	LOWTIDE_TEST_DATABASE_URL=$(TEST_DATABASE_URL) $(BIN)/python tests/scale_env.py $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) lowtide-data .pytest_cache

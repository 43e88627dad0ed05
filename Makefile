# The README's commands. `make run` and `make test` create the virtual environment when
# it is missing (or when pyproject.toml / requirements.lock changed).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, from TORCH_INDEX when set (pip's --index-url, as PyTorch documents).
# Left empty, pip's own configuration decides: from plain PyPI that is the multi-GB CUDA build
# on Linux (the CPU wheel comes only where pip is configured to find it, e.g. a local wheel
# directory). For the CPU build on any machine:
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PORT ?= 3000

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export BENTOML_DO_NOT_TRACK ?= true
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv run test test-fast serve ui ui-db-stop deploy worker monitor lint lock clean

$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

venv: $(BIN)/.installed

run: venv  ## the whole pipeline on params.yaml (the embedded sample by default)
	$(BIN)/textgate run
	$(BIN)/textgate status

test: venv  ## every test, the slow end-to-end ones included
	$(BIN)/pytest

test-fast: venv  ## everything but the end-to-end tests
	$(BIN)/pytest -m "not slow"

serve: venv  ## serve production on $(PORT), following the registry (live switch)
	$(BIN)/textgate serve --port $(PORT)

# `make ui` also points the Prefect CLI (and textgate) at that server: it makes a Prefect
# profile `textgate` with PREFECT_API_URL and makes it the active one. Go back to a
# temporary server per run with `prefect profile use ephemeral`.
UI_PORT ?= 4200
UI_API_URL := http://127.0.0.1:$(UI_PORT)/api
# `make ui DB=postgres`: the server's database is a local PostgreSQL in PG_DIR, started here
# (initialised on first use) and left running for the next `make ui`; `make ui-db-stop`.
DB ?= sqlite
PG_DIR ?= .textgate/postgres

ui: venv  ## a local Prefect server and UI on http://127.0.0.1:4200 (SQLite in ~/.prefect, or DB=postgres)
	-@$(BIN)/prefect profile create textgate >/dev/null 2>&1
	@$(BIN)/prefect --profile textgate config set PREFECT_API_URL=$(UI_API_URL) \
		PREFECT_SERVER_ANALYTICS_ENABLED=false >/dev/null
	-@$(BIN)/prefect profile use textgate >/dev/null 2>&1
	@echo "Prefect profile 'textgate' is active: PREFECT_API_URL=$(UI_API_URL)"
ifeq ($(DB),postgres)
	@url=$$($(BIN)/python -m textgate.pglocal start $(PG_DIR) --driver postgresql+asyncpg) \
		&& echo "Prefect's database: PostgreSQL in $(PG_DIR) ($$url)" \
		&& PREFECT_API_DATABASE_CONNECTION_URL=$$url \
		exec $(BIN)/prefect server start --host 127.0.0.1 --port $(UI_PORT)
else ifeq ($(DB),sqlite)
	$(BIN)/prefect server start --host 127.0.0.1 --port $(UI_PORT)
else
	$(error DB=$(DB): use DB=sqlite (the default) or DB=postgres)
endif

ui-db-stop:  ## stop the PostgreSQL that `make ui DB=postgres` started
	$(BIN)/python -m textgate.pglocal stop $(PG_DIR)

deploy: venv  ## register the nightly pipeline and the drift monitor (needs `make ui` running)
	$(BIN)/textgate deploy

worker: venv  ## run the deployments: a process worker on deploy.work_pool
	$(BIN)/textgate worker

monitor: venv  ## check the serving request log for drift once
	$(BIN)/textgate monitor

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

lock: venv  ## refresh requirements.lock from the current environment
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch==' > requirements.lock

clean:
	rm -rf data/validate data/prepare data/train data/evaluate .pytest_cache

# fedveil — set-up and entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Extra pip arguments for the torch install. On the project's machines torch==2.13.0 resolves to
# a local CPU wheel; elsewhere use TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# to get the CPU build instead of PyPI's default (CUDA) build.
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedveil-installed
DEMO_OUT ?= demo-out

.PHONY: demo test test-fast lint typecheck docs unit venv install browser proto bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first (pinned), so the range in pyproject is already satisfied and pip pulls nothing bigger.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv install: $(STAMP)

# Debian's chromium for the dashboard's end-to-end tests; never a browser download.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "WARNING: could not install chromium; browser tests will be skipped"; }

lint: $(STAMP)
	$(BIN)/ruff check fedveil tests $(wildcard benchmarks) $(wildcard examples)
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# Every test once: those not marked `serial` on two xdist workers (--dist loadgroup keeps an
# xdist_group on one worker), then the `serial` ones (timing-sensitive under load, such as the Ray
# tests' fixed start-up windows) alone. Both runs always happen, and `unit` fails if either does.
unit: $(STAMP) browser
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not serial"; parallel=$$?; \
	$(BIN)/python -m pytest -q -m serial; serial=$$?; \
	test $$parallel -eq 0 && test $$serial -eq 0

# The documentation site (mkdocs.yml, docs/): --strict turns a broken link, a missing page or an
# unresolvable API reference into a failure.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The static checks, the docs build and the browser install run beside each other (each is mostly one
# core, and none writes what another reads), then the tests (-o browser: already tried, not twice).
test: $(STAMP)
	$(MAKE) --no-print-directory -j4 lint typecheck docs browser
	$(MAKE) --no-print-directory -o browser unit

# The edit-run loop: lint and every test not marked slow, on two workers (under a minute); `make test`
# is the gate and runs everything (see `unit`).
test-fast: $(STAMP)
	$(BIN)/ruff check fedveil tests $(wildcard benchmarks) $(wildcard examples)
	$(BIN)/python -m pytest -q -m "not slow" -n 2

demo: $(STAMP)
	$(BIN)/fedveil demo healthcare --out $(DEMO_OUT)

bench: $(STAMP)
	$(BIN)/fedveil bench secagg --clients 100 --dim 100000 --graph harary --dropout 0.1 --dropout-stage masked

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I fedveil/protocol --python_out=fedveil/protocol \
	  --grpc_python_out=fedveil/protocol --pyi_out=fedveil/protocol fedveil/protocol/fedveil.proto
	sed -i 's/^import fedveil_pb2/from fedveil.protocol import fedveil_pb2/' fedveil/protocol/fedveil_pb2_grpc.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site

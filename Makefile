# The README's two commands: `make demo` and `make test`. Both set up .venv first (idempotent).
PY := .venv/bin/python
# The CPU engine, and with it the import shim for torchvision / sgl_kernel (sglang_kvcomm/cpu_shim.py).
export SGLANG_USE_CPU_ENGINE := 1

.PHONY: setup demo test test-all lint

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@$(PY) benchmarks/demo.py $(DEMO_ARGS)

# pytest exits 5 when it collects nothing: for us that is a broken suite, not a pass.
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-all: setup
	@$(PY) -m pytest -m "" $(PYTEST_ARGS)

lint: setup
	@$(PY) -m ruff check . && $(PY) -m ruff format --check .

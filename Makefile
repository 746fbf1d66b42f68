# The two set-up commands (see README): `make quickstart` and `make test`.
# Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first and pinned: on these machines 2.13.0 is the CPU build that lies on disk, while a
# plain `torch` (asked for directly or by another package) pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install install-test browser postgresql quickstart inference-quickstart test lint clean toyworld

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e .
	touch $@

# DeepSpeed JIT-compiles its CPU shared-memory allreduce op on first use (about 35 s, once per
# venv): build it here, with the install, rather than inside the first DeepSpeed test.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,faces]'
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

quickstart: install
	$(VENV)/bin/dreamsweep run configs/quickstart.yaml
	$(VENV)/bin/dreamsweep select configs/quickstart.yaml
	$(VENV)/bin/dreamsweep report configs/quickstart.yaml

# The inference study compares `tiny` with the tiny quickstart's registered best LoRA: that sweep
# runs first (a finished sweep trains nothing again).
inference-quickstart: install
	$(VENV)/bin/dreamsweep run configs/tiny_quickstart.yaml
	$(VENV)/bin/dreamsweep select configs/tiny_quickstart.yaml
	$(VENV)/bin/dreamsweep run configs/inference_quickstart.yaml
	$(VENV)/bin/dreamsweep report configs/inference_quickstart.yaml

# The toy world's models (toyworld/build.py: VAE, CLIP, UNet, aesthetic head, oracle), deterministic
# from the seed; rerun after a kill and each stage resumes from its last checkpoint.
TOYWORLD_OUT ?= /tmp/toyworld-models
toyworld: install
	$(PY) -m toyworld.build $(TOYWORLD_OUT)

# The report's browser test drives Debian's Chromium, and the tracking load test a PostgreSQL
# server started from Debian's binaries (root installs them, as CI has).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  apt-get install -y -q chromium chromium-driver || \
	  (apt-get update -q && apt-get install -y -q chromium chromium-driver)

postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  apt-get install -y -q postgresql || \
	  (apt-get update -q && apt-get install -y -q postgresql)

test: install-test browser postgresql
	$(PY) -m pytest

lint: install-test
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache test-artifacts

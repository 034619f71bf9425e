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

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-nodeps.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check pip==26.3 setuptools==84.2.1 wheel==0.48.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@problems="$$($(PY) -m pip check 2>&1 | grep -v -i -E '^($(NODEPS)) |^No broken requirements')"; \
	  if [ -n "$$problems" ]; then echo "$$problems"; exit 1; fi
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m modula_ray.evaluation.lm_eval_hook   # lm_eval --model modula (see that module)
	$(PY) -m modula_ray.train.deepspeed_ops       # DeepSpeed's CPU all-reduce op, compiled once (see that module)
	@touch $(STAMP)

# The product tour on the embedded default (SmolLM2-135M-Instruct, in-process Ray, 2 CPU cores):
# modula_res and the molora baseline trained on 4 domains, finance added to both, both and the base
# model evaluated with lm-eval (first 6 items per task) into runs/demo/report.md; then Ray Serve
# serves modula_res+finance and the openai client asks it one question per domain. Rerunning skips
# every finished part (rm -rf runs/demo to start over); ARGS reach the experiment, e.g. ARGS='--set eval.limit=16'.
demo: install
	$(PY) jobs/experiment.py paper --config jobs/configs/demo-tour.yaml --out runs/demo --num-cpus 3 $(ARGS)
	$(VENV)/bin/modula-ray chat-tour runs/demo/seed0/modula_res+finance
	@echo "Report:  runs/demo/report.md   (figures: $$(cd runs/demo && ls *.png | paste -sd' '))"
	@echo
	@echo "Next:"
	@echo "  .venv/bin/modula-ray tune router --run runs/demo/seed0/modula_res      # Ray Tune searches the router (ASHA)"
	@echo "  .venv/bin/modula-ray serve runs/demo/seed0/modula_res+finance          # the OpenAI-compatible endpoint on :8000"
	@echo "  .venv/bin/python jobs/experiment.py paper --config jobs/configs/paper-smollm2.yaml --out runs/paper"
	@echo "                                    # every method (lora, molora, modula_flan, modula_res, mode), 3 seeds, Tune"
	@echo "  cluster/local.sh up && eval \"\$$(cluster/local.sh env)\" && .venv/bin/ray job submit --working-dir . -- \\"
	@echo "      python jobs/pipeline.py --config jobs/configs/demo.yaml --out \$$PWD/runs/demo-cluster   # a 2-node Ray cluster here"
	@echo "  .venv/bin/modula-ray cost runs/demo/seed0/modula_res+finance --against runs/demo/seed0/molora+finance"
	@echo "  less runs/demo/logs/seed0__modula_res__train.log                       # each part's own output"

test: install
	$(VENV)/bin/pytest

# The inner loop: tests/unit only (no Ray, no server); every integration test is marked slow.
test-fast: install
	$(VENV)/bin/pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache runs

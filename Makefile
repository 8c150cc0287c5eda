# Two commands set up and run everything on a fresh machine: `make lab` and `make test`.
# Both create or reuse the project-local .venv.
SHELL := /bin/bash
PYTHON ?= python3
# Where torch's CPU wheel comes from: empty keeps pip's configured index (these machines' mirror has the
# CPU build). Elsewhere on Linux the default index's torch is the CUDA build: pass
# `make lab TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX_URL ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rankserve-installed

.PHONY: venv lab test bench losses lint selftest faults two-stage cache lifecycle widths clean-artifacts

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU wheel, so that no resolver pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The lab on embedded defaults: synthetic data, a local Redis, local Ray.
lab: venv
	$(PY) models/train.py --arch mlp --max-seconds 50
	$(PY) models/train.py --arch attention --max-seconds 60
	$(PY) export/quantize.py
	$(PY) loadtest/openloop.py --self-test --seconds-per-step 2
	$(PY) loadtest/sweep.py --profile quick
	# Where the result cache pays: both rankers, 100 and 1000 documents, fixed hit ratios and Zipf traffic.
	$(PY) loadtest/cache_ladder.py --profile quick
	# Two-stage retrieval then ranking (docs/two_stage.md): corpus, towers, ranker, the short ladder (which
	# builds the indexes it needs; `python export/build_index.py --all` builds every kind).
	$(PY) models/two_stage.py --max-seconds 25 --tower-seconds 25
	$(PY) loadtest/two_stage.py --profile quick

# The open-loop load generator's own capacity on this machine: results/loadgen/<cpu>-<isa>-selftest.md.
selftest: venv
	$(PY) loadtest/openloop.py --self-test

# The fault suite in full (about 40 minutes: the 10-minute soaks and the 60 s overload included):
# results/reliability/<cpu>-<isa>.md and .csv. Run it on a quiet machine, from a commit.
faults: venv
	$(PY) loadtest/faults.py --profile full

# The cache ladder in full (0% to 99% hits, longer phases): results/cache/<cpu>-<isa>-full.md
cache: venv
	$(PY) loadtest/cache_ladder.py --profile full

# The two-stage ladder in full (every index kind and K, int8 and fp32, Milvus Lite): results/two_stage/<cpu>-<isa>-full.md
two-stage: venv
	$(PY) loadtest/two_stage.py --profile full

# Where int8 starts to pay as the MLP grows (68K, 126K, 251K, 498K and 1M multiply-adds per document, each
# benchmarked in 3 rounds; 5 to 10 minutes):
# results/models/<cpu>-<isa>-mlp-widths.md
widths: venv
	$(PY) export/width_curve.py

# The model lifecycle (docs/lifecycle.md): offline-online alignment (A/B and interleaving on three model pairs,
# about 5 minutes), the drift scenario (1 minute) and retraining with its two gates (about 2 minutes):
# results/online_eval/<cpu>-<isa>{,-drift,-retrain}.md
lifecycle: venv
	$(PY) loadtest/online_eval.py
	$(PY) serve/drift.py reference
	$(PY) loadtest/drift_run.py
	$(PY) loadtest/retrain_run.py

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) -m pytest tests/bench --benchmark-only --benchmark-enable

# Pairwise vs listwise, with data: writes results/ltr_losses.md.
losses: venv
	$(PY) models/compare_losses.py

lint: venv
	$(VENV)/bin/ruff check .

clean-artifacts:
	rm -rf artifacts

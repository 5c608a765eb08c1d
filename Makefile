# The README's two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= demo-out
DEMO_ARGS ?=

.PHONY: demo readme-results test test-slow install benchmarks clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision are pinned to the builds this project is tested with; pip takes them
	# from the local wheel cache when present (no multi-GB download on the dev machines).
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/python -m pip install -q torch torchvision
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The demo writes its README results block to $(OUT)/readme-results.md and never edits a
# tracked file; `make readme-results` (after `make demo`) copies that block into README.md.
demo: $(STAMP)
	$(BIN)/piaa-dist demo --out $(OUT) $(DEMO_ARGS)

readme-results: $(STAMP)
	$(BIN)/python -m piaa_dist.orchestration.report $(OUT)/readme-results.md README.md

# Lint first (ruff, configured in pyproject.toml): a lint error fails the test command, and CI.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

benchmarks: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache

# Mutation testing of the core modules ([tool.mutmut] in pyproject.toml); not part of CI (hours
# on 2 cores). MUTANTS narrows the run to mutant-name globs, e.g.
#   make mutation MUTANTS="piaa_dist.personalize.* piaa_dist.train.xǁMetaTrainerǁapply_flat__*"
# Prints the per-module kill rates (per function when MUTANTS narrows the run) and survivors;
# writes benchmarks/results/mutation.json. Names given in MUTANTS are rerun even when they have
# a result; without MUTANTS only mutants with no result yet run. One torch/BLAS thread per
# mutant: each runs tiny tensors, and thread pools spinning on a shared machine burn the CPU
# time that mutmut's per-mutant limit counts (false timeouts).
.PHONY: mutation
MUTMUT ?= mutmut==3.8.1
MUTANTS ?=
MUTATION_CHILDREN ?= 2
mutation: $(STAMP)
	$(BIN)/python -m pip install -q "$(MUTMUT)"
	set -f; OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 19 $(BIN)/mutmut run --max-children $(MUTATION_CHILDREN) $(MUTANTS)
	$(BIN)/python tests/mutation/kill_rates.py --json benchmarks/results/mutation.json --survivors $(if $(MUTANTS),--by-function)

# A seeded uniform sample of each module's mutants (tests/mutation/sample.py): the whole set is
# days of CPU here. Draws PER mutants per module of SAMPLE_MODULES with SEED (generating the
# mutants first if needed), runs mutmut on them, prints each module's kill rate with its 95%
# Wilson interval and records every drawn name's result under PHASE in SAMPLE_JSON, e.g.
#   make mutation-sample PER=50 SEED=17 PHASE=before
#   make mutation-sample PER=25 SEED=17 SAMPLE_MODULES=checkpoint,data.stream PHASE=before
.PHONY: mutation-sample
PER ?= 50
SEED ?= 17
SAMPLE_MODULES ?= meta,evaluate,protocol,personalize,train
PHASE ?= after
SAMPLE_JSON ?= tests/mutation/sample_$(SEED).json
# CARRY=before: report mutants not run now as killed where PHASE `before` killed them (after a
# rerun of the survivors alone with `mutmut run NAMES`; every drawn name reruns otherwise).
CARRY ?=
SAMPLE = $(BIN)/python tests/mutation/sample.py --per $(PER) --seed $(SEED) --modules $(SAMPLE_MODULES)
mutation-sample: $(STAMP)
	$(BIN)/python -m pip install -q "$(MUTMUT)"
	# First use: mutmut generates every mutant (and maps tests to functions) before it filters
	# by name; a glob matching no mutant then stops it with an assertion (expected: the result
	# files now exist, which is what the second test checks). Not tried here (mutants/ existed).
	test -f mutants/piaa_dist/meta.py.meta || (set -f; nice -n 19 $(BIN)/mutmut run 'piaa_dist.__no_such_mutant__*' \
		|| test -f mutants/piaa_dist/meta.py.meta)
	set -f; OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 19 $(BIN)/mutmut run --max-children $(MUTATION_CHILDREN) \
		$$($(SAMPLE) draw)
	$(SAMPLE) report --json $(SAMPLE_JSON) --phase $(PHASE) $(if $(CARRY),--carry-killed $(CARRY))

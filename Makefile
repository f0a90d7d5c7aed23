# The two commands of the README quick start. Each works on a fresh machine: the virtualenv
# is created and the pinned requirements installed on first use (and when they change).
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TOKENIZERS_PARALLELISM := false

.PHONY: run smoke test bench slurm

run: $(STAMP)
	snakemake --profile profiles/local $(ARGS)

smoke: $(STAMP)
	snakemake --profile profiles/local --configfile config/smoke.yaml $(ARGS)

# The suite includes tests on a real SLURM (tests/test_slurm.py): start it first (root, Debian).
test: $(STAMP) slurm
	python -m pytest $(ARGS)

# A single-node SLURM on this machine: installed and started if needed, else a no-op.
slurm:
	bash tests/slurm/start-local-slurm.sh

$(STAMP): workflow/envs/requirements.txt workflow/envs/requirements-nodeps.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -r workflow/envs/requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -r workflow/envs/requirements-nodeps.txt
	touch $@

# make demo   set up .venv and score the sample data with the embedded SmolLM2 on 3 MPI ranks
# make test   set up .venv and run the test suite
# make audit  privacy audit of the embedded SmolLM2 on the sample data (table + figures in audit_results/)
# make lint   ruff over the package, jobs and tests
VENV := .venv/bin
RANKS ?= 3

.PHONY: setup demo test lint audit
setup:
	bash scripts/setup.sh

demo: setup
	mkdir -p results
	$(VENV)/mpiexec -n $(RANKS) $(VENV)/python jobs/infer.py task=score split.k=2 \
		output.path=results/demo.h5 output.overwrite=true

audit: setup
	$(VENV)/mpiexec -n 2 $(VENV)/python jobs/audit.py audit.out_dir=audit_results

test: setup
	$(VENV)/python -m pytest -q

lint: setup
	$(VENV)/ruff check nesa_hpc jobs tests

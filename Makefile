# make demo   set up .venv and score the sample data with the embedded SmolLM2 on 3 MPI ranks
# make test   set up .venv and run the test suite
# make audit  privacy audit of the embedded SmolLM2 on the sample data (table + figures in audit_results/)
# make train  10 LoRA steps of SmolLM2 on the built-in public text on 3 MPI ranks (adapter in results/train)
# make lint   ruff over the package, jobs and tests
VENV := .venv/bin
RANKS ?= 3

.PHONY: setup demo test lint audit train
setup:
	bash scripts/setup.sh

demo: setup
	mkdir -p results
	$(VENV)/mpiexec -n $(RANKS) $(VENV)/python jobs/infer.py task=score split.k=2 \
		output.path=results/demo.h5 output.overwrite=true

train: setup
	mkdir -p results
	$(VENV)/mpiexec -n $(RANKS) $(VENV)/python jobs/train.py train.max_steps=10 train.out_dir=results/train \
		train.overwrite=true data.max_length=64 data.batch_size=4 train.grad_accum=2

audit: setup
	$(VENV)/mpiexec -n 2 $(VENV)/python jobs/audit.py audit.out_dir=audit_results

test: setup
	$(VENV)/python -m pytest -q

lint: setup
	$(VENV)/ruff check nesa_hpc jobs tests

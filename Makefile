# The two commands a fresh machine needs: `make demo` and `make test`. Both install what is missing into .venv
# first; the install is a no-op while setup.cfg and requirements/ are unchanged.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch requirement: the local CPU wheel here. On a GPU machine install your CUDA torch first and pass
# TORCH_REQ= (empty) so the installed one is kept (see README, "Installing on a GPU machine").
TORCH_REQ ?= requirements/torch-cpu.txt
STAMP := $(VENV)/.eqlightning-installed
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements/cpu-lock.txt requirements/dev.txt requirements/torch-cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (pinned, --no-deps: see requirements/cpu-lock.txt)"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(if $(TORCH_REQ),-r $(TORCH_REQ)) \
		-r requirements/cpu-lock.txt -r requirements/dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m eqlightning.envcheck
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) cli.py fit --config configs/dp/breastmnist_eps8.yaml

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Speed of equivariant and private training, side by side (see benchmarks/run.py); results name the machine.
MACHINE ?= cpu-$(shell nproc)core
bench: $(STAMP)
	$(PY) benchmarks/run.py --machine "$(MACHINE)" --out benchmarks/results/$(MACHINE).json

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache *.egg-info

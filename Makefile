# cDDPM reproduction kit. Two commands for a newcomer: `make reproduce` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= quick
JOBS ?= 2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.setup-done
# torch: the CPU build that lies on these machines. TORCH_SPEC is passed to pip as words, so it can carry pip
# options, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" (quote a requirement
# holding < or > once more: TORCH_SPEC="'torch>=2.13' --index-url ..."). The venv records the spec it was set up
# with (a venv set up before the record: the default) and keeps it until another TORCH_SPEC is given.
TORCH_DEFAULT := torch==2.13.0
TORCH_RECORD := $(VENV)/.torch-spec
TORCH_RECORDED := $(if $(wildcard $(TORCH_RECORD)),$(strip $(file < $(TORCH_RECORD))))
INSTALLED_TORCH_SPEC := $(or $(TORCH_RECORDED),$(if $(wildcard $(STAMP)),$(TORCH_DEFAULT)))
TORCH_SPEC ?= $(or $(INSTALLED_TORCH_SPEC),$(TORCH_DEFAULT))
KERNEL := cddpm-uad

.PHONY: setup reproduce smoke test test-fast lab bench bench-gpu clean-runs help FORCE

help:
	@echo "make reproduce [PROFILE=quick|smoke|paper] [JOBS=N]   run the whole paper (default: quick, embedded data)"
	@echo "make test                                             full test suite (sets up .venv first)"
	@echo "make lab                                              JupyterLab on notebooks/ with the kit's kernel"
	@echo "make smoke                                            smoke profile end to end"
	@echo "make bench                                            speed benchmarks -> BENCHMARKS.md"
	@echo "make bench-gpu [TORCH_SPEC=...]                       U-Net/inference/paper-profile benchmarks on CUDA"

setup: $(STAMP)

# A TORCH_SPEC other than the installed one sets the venv up again and replaces torch: pip alone would keep
# 2.13.0+cpu, which already satisfies "torch==2.13.0" from any index.
ifneq ($(INSTALLED_TORCH_SPEC),$(strip $(TORCH_SPEC)))
$(STAMP): FORCE
TORCH_REPLACE := $(INSTALLED_TORCH_SPEC)
endif

FORCE:

$(STAMP): pyproject.toml
	@rm -f $(STAMP) $(TORCH_RECORD)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(if $(TORCH_REPLACE),$(PIP) uninstall -y torch)
	@# torch first, pinned, so nothing pulls a CUDA build; no torchvision (breaks this torch).
	$(PIP) install $(TORCH_SPEC) 2>&1 | grep -v "^WARNING: Location" ; test $${PIPESTATUS[0]} -eq 0
	$(PIP) install -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" ; test $${PIPESTATUS[0]} -eq 0
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (cddpm-uad)" >/dev/null
	@printf '%s\n' '$(subst ','\'',$(strip $(TORCH_SPEC)))' > $(TORCH_RECORD)
	@touch $(STAMP)

reproduce: setup
	$(VENV)/bin/cddpm-uad reproduce --profile $(PROFILE) -j $(JOBS)

smoke: setup
	$(VENV)/bin/cddpm-uad reproduce --profile smoke

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

bench: setup
	$(PIP) install -e ".[dev,bench]" 2>&1 | grep -v "^WARNING: Location" ; test $${PIPESTATUS[0]} -eq 0
	$(PY) -m benchmarks.run_all

# Needs a CUDA build of torch (TORCH_SPEC) and a GPU; adds its own section to BENCHMARKS.md.
bench-gpu: setup
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'make bench-gpu: the venv holds torch ' \
		+ torch.__version__ + ', a build without CUDA; set it up with a CUDA build: make bench-gpu TORCH_SPEC=\"torch==' \
		+ torch.__version__.split('+')[0] + ' --index-url <a CUDA wheel index>\"')"
	$(PIP) install -e ".[dev,bench]" 2>&1 | grep -v "^WARNING: Location" ; test $${PIPESTATUS[0]} -eq 0
	$(PY) -m benchmarks.bench_unet --device cuda --amp bf16 --channels-last
	$(PY) -m benchmarks.run_all --assemble

clean-runs:
	rm -rf runs/smoke

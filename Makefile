# Set-up and entry points. Both targets create the virtual environment on first use.
#   make run DATA=<taco folder> OUT=<output folder> [TASK=binary:Bottle]
#     (first downloads DOWNLOAD_ARGS' subset of TACO into DATA when DATA/annotations.json is missing)
#   make test
PYTHON ?= python3
VENV ?= .venv
# cpu installs tensorflow-cpu; use EXTRAS=gpu for tensorflow[and-cuda].
EXTRAS ?= cpu
DATA ?= data/taco
OUT ?= out
TASK ?= binary:Bottle
RUN_ARGS ?=
DOWNLOAD_ARGS ?= --max-images 100
PYTEST_ARGS ?=

STAMP := $(VENV)/.raywaste-installed-$(EXTRAS)

.PHONY: venv run test clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[$(EXTRAS),test]"
	touch $@

run: $(STAMP)
	test -f "$(DATA)/annotations.json" || $(VENV)/bin/raywaste download "$(DATA)" $(DOWNLOAD_ARGS)
	$(VENV)/bin/raywaste run "$(DATA)" "$(OUT)" --task "$(TASK)" $(RUN_ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

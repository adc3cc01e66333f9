# Two commands set everything up: `make test` and `make book` (see README.md).
# Both create .venv if it is missing and install the pinned versions from constraints.txt.
# `make test-colab` runs the same tests in a second venv, .venv-colab, with Colab's
# preinstalled versions (constraints-colab.txt) instead.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NB     ?= notebooks/*.ipynb
# The unit tests, then every notebook under nbval with the fast `smoke` profile.
TESTS  := tests notebooks --nbval-lax --nbval-current-env

COLAB_VENV  ?= .venv-colab
COLAB_PY    := $(COLAB_VENV)/bin/python
COLAB_STAMP := $(COLAB_VENV)/.installed

.PHONY: install install-colab test test-colab book execute bench constraints constraints-colab clean distclean

install: $(STAMP)

# torch is installed first and alone so that pip takes the pinned CPU build and never
# resolves it through another package (which could pull a multi-GB CUDA build).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,book]"
	@touch $(STAMP)

# Unit tests, then every notebook under nbval with the fast `smoke` profile.
test: install
	GENART_PROFILE=smoke $(PY) -m pytest $(TESTS)

# The same tests against Colab's preinstalled versions (IPython 7.34, ipywidgets 7.7, Colab's
# numpy, matplotlib, ...: constraints-colab.txt) on Python 3.11, the only Python with a CPU
# build of torch here; torch itself is the pinned CPU build of constraints.txt, installed
# first and alone as above. pip refuses the install if pyproject.toml asks Colab to upgrade.
install-colab: $(COLAB_STAMP)

$(COLAB_STAMP): pyproject.toml constraints.txt constraints-colab.txt
	@test -x $(COLAB_PY) || $(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch
	$(COLAB_PY) -m pip install --quiet --disable-pip-version-check -c constraints-colab.txt -e ".[test]"
	@touch $(COLAB_STAMP)

# PYDEVD_DISABLE_FILE_VALIDATION: ipykernel 6.17's debugger otherwise warns about
# frozen modules on every kernel start.
test-colab: install-colab
	GENART_PROFILE=smoke PYDEVD_DISABLE_FILE_VALIDATION=1 $(COLAB_PY) -m pytest $(TESTS)

# The static site, from the committed (already executed) notebooks; zero warnings allowed.
book: install
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# Re-execute notebooks in place (profile from GENART_PROFILE, default auto: gpu if CUDA
# is available, else cpu). One notebook: make execute NB=notebooks/01_foundations.ipynb
execute: install
	@for nb in $(NB); do \
	  echo "executing $$nb (profile $${GENART_PROFILE:-auto})"; \
	  GENART_PROFILE=$${GENART_PROFILE:-auto} $(VENV)/bin/jupyter execute --inplace --timeout=-1 $$nb || exit 1; \
	done

bench: install
	@for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# Re-pin constraints.txt from the current .venv (after a deliberate upgrade).
constraints: install
	@{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v 'genart-utils' | sed 's/+cpu$$//'; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt

# Re-resolve the second section of constraints-colab.txt in a fresh .venv-colab, after an
# edit of its first section (Colab's own list, which is kept as it is).
constraints-colab:
	rm -rf $(COLAB_VENV)
	$(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_PY) .ci/colab_constraints.py head > $(COLAB_VENV)/colab-list.txt
	$(COLAB_PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch
	$(COLAB_PY) -m pip install --quiet --disable-pip-version-check -c $(COLAB_VENV)/colab-list.txt "pyparsing<3.3" -e ".[test]"
	$(COLAB_PY) -m pip freeze --exclude-editable | $(COLAB_PY) .ci/colab_constraints.py write
	@touch $(COLAB_STAMP)

clean:
	rm -rf _build .pytest_cache
	find . \( -path ./$(VENV) -o -path ./$(COLAB_VENV) \) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(COLAB_VENV) *.egg-info

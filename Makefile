# Two commands set everything up: `make test` and `make book` (see README.md).
# Both create .venv if it is missing and install the pinned versions from constraints.txt.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NB     ?= notebooks/*.ipynb

.PHONY: install test book execute bench constraints clean distclean

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
	GENART_PROFILE=smoke $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env

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
	@{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^genart-utils' | sed 's/+cpu$$//'; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt

clean:
	rm -rf _build .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info

# snakes — the two commands a newcomer needs are `make demo` and `make test`.
# Each creates its own virtual environment (.venv) and installs what it needs.
#
# TORCH picks the PyTorch build. The default is the CPU build that CI pins; on a CUDA machine use e.g.
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed

.PHONY: demo test test-browser test-fast notebooks export check-export bench lab clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,data,test]"
	touch $(STAMP)

install: $(STAMP)

## The main job: train the tiny model on the bundled corpus, then generate from it.
demo: $(STAMP)
	$(VENV)/bin/snakes demo

## Every test: the library (pytest) and every chapter run top to bottom (nbval), then the widget chapters used in
## JupyterLab in headless Chromium (alone, so that nothing else loads the CPU; skips with the reason without Chromium).
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile tests notebooks --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg -m "not browser"
	$(MAKE) test-browser

## The widget chapters as a learner uses them: JupyterLab, Run All, every slider moved (tests/test_browser.py).
test-browser: $(STAMP)
	$(PY) -m pytest tests/test_browser.py -m browser -rA --durations=0

## Library tests only (no notebooks), for a quick loop.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 tests -m "not slow"

## Regenerate snakes_lib/ from the notebooks.
export: $(STAMP)
	$(VENV)/bin/nbdev-export

## Fail if snakes_lib/ is not exactly what the notebooks export.
check-export: export
	@git diff --exit-code -- snakes_lib || (echo "snakes_lib/ differs from the notebooks: edit the notebook, run make export, commit both" && exit 1)
	@test -z "$$(git status --porcelain --untracked-files=all -- snakes_lib)" || (git status --short -- snakes_lib; echo "snakes_lib/ has files the notebooks did not produce, or uncommitted ones" && exit 1)

## Re-execute every notebook in place (stored outputs are what learners see on the web).
notebooks: $(STAMP)
	for nb in notebooks/[0-9]*.ipynb; do $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace "$$nb" || exit 1; done
	$(PY) tools/tidy_notebooks.py notebooks/*.ipynb
	$(VENV)/bin/nbdev-export

## CPU benchmarks (each prints a table and writes benchmarks/results/*.json); add --device cuda on a GPU.
bench: $(STAMP)
	$(PY) benchmarks/ssd.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/report.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

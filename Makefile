# Two set-up commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
RUN    ?= runs/demo
# numba (umap-learn) compiles on first use; keep its cache on disk between runs.
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba

.PHONY: install demo test test-fast bench bench-scale clean

$(VENV)/.installed: pyproject.toml requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -r requirements-test.txt
	$(PIP) install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/actatlas build --model efficientnet_lite0 --images sample:1000 --per-image 2 \
		--levels 10,20 --out $(RUN) --threads 2
	$(VENV)/bin/actatlas export $(RUN) --out $(RUN)/site --single-file -q
	@echo
	@echo "The atlas is in $(RUN)/atlas/blocks.8/: level-10.png and level-20.png (canvases),"
	@echo "level-*.json (cells: counts, top classes, icon scores) and $(RUN)/summary.json."
	@echo "Explore it in a browser: open $(RUN)/site/index.html, or run .venv/bin/actatlas serve $(RUN)"

test: install
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

# The tests not marked slow (no UMAP, no real model, no Ray, no CLI subprocesses), on both cores.
test-fast: install
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile tests

# Benchmarks for BENCHMARKS.md (about 15-25 minutes on a 2-core CPU; results also in bench-out/).
bench: install
	$(PY) scripts/bench.py
	$(PY) scripts/bench_grid.py --json bench-out/grid.json grid
	$(PY) scripts/bench_grid.py --json bench-out/layout.json layout --sizes 10000
	$(PY) scripts/bench_render.py
	$(PY) scripts/bench_viewer.py

# The 1M-row stages (whiten, grid, PCA, UMAP sizes + extrapolation) on a synthetic 1M x 512 float16
# store, each in a fresh process with its time and peak memory (~15-20 min on 2 cores; BENCHMARKS.md).
bench-scale: install
	$(PY) scripts/bench_scale.py --layout-sizes 30000,100000 --fit 30000 --transform 300000 --json bench-out/scale.json

clean:
	rm -rf $(VENV) runs .cache .pytest_cache

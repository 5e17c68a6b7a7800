# Quick start: `make demo` and `make test` on a fresh clone. Both create or refresh .venv,
# install the package (editable, which builds runtime_ext through CMake) and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.compressor-installed
# Reinstall (and so rebuild the custom-op library) whenever packaging or C++/CUDA sources change.
BUILD_INPUTS := pyproject.toml compressor/runtime.py $(shell find runtime_ext -type f 2>/dev/null)
# The CPU build of torch that this machine serves locally; an unpinned torch pulls GBs of CUDA.
TORCH_PIN ?= torch==2.13.0
EXTRAS ?= cpu,test,sweep

DEMO_MODEL ?= models/checkpoints/vgg.pt
DEMO_ARCH ?= vgg
DEMO_CALIB ?= models/data/fashion_mnist_calib.npz
DEMO_DATA ?= models/data/fashion_mnist_eval.npz
DEMO_OUT ?= build/demo

.PHONY: setup demo test test-all test-cuda lint bench clean browser

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/compressor compress $(DEMO_MODEL) --arch $(DEMO_ARCH) --method svd --ratio 0.5 \
	    --data $(DEMO_CALIB) -o $(DEMO_OUT)/$(DEMO_ARCH)_svd.onnx
	$(VENV)/bin/compressor evaluate $(DEMO_OUT)/$(DEMO_ARCH)_svd.onnx --reference $(DEMO_MODEL) \
	    --arch $(DEMO_ARCH) --data $(DEMO_DATA)

# pytest exits 5 when it collected no test: say so and fail, since a suite that runs nothing
# proves nothing. `make test` leaves out the tests marked slow (whole-zoo runs, Ray clusters:
# each has a fast variant in the default run); `make test-all` runs every test.
TEST_MARKS ?= not slow
test: $(STAMP) browser
	@$(PY) -m pytest -m "$(TEST_MARKS)" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): failing"; exit 1; fi; exit $$rc

test-all: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The sweep report's test opens report.html in Debian's headless chromium (through
# chromium-driver): installed here when missing, so CI (root) runs it too. Without apt the
# test skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; \
	else echo "no apt-get: chromium not installed, the sweep report's browser test will skip"; fi

# CUDA kernels against the CPU ones on a GPU machine, in a separate venv (never both
# onnxruntime and onnxruntime-gpu in one): make test-cuda VENV=.venv-gpu EXTRAS=gpu,test
test-cuda: $(STAMP)
	$(PY) -m pytest -m cuda $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check compressor passes models tests bench

# The benchmarks' own dependencies (the `bench` extra), installed on top of the package.
BENCH_STAMP := $(VENV)/.compressor-bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[$(EXTRAS),bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/bench_compression.py
	$(PY) bench/bench_structural.py
	$(PY) bench/bench_diffconv.py
	$(PY) bench/bench_lsh_conv.py
	$(PY) bench/bench_sweep.py
	$(PY) bench/bench_latency.py
	$(PY) bench/bench_real_graphs.py
	$(PY) bench/bench_fast_conv.py
	$(PY) bench/bench_tool_cost.py

clean:
	rm -rf build $(VENV)

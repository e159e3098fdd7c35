# The two set-up commands of the README:
#   make demo   install everything, then train the tiny DINO preset on Fashion-MNIST (CPU, ~10 min)
#   make test   install everything, then type-check src/fovea (mypy) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: install fmnist demo test test-all bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

# Fashion-MNIST from Debian when running as root; otherwise see README (path= or `fovea data download fmnist`).
fmnist:
	@if [ ! -e $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || \
		echo "warning: could not install dataset-fashion-mnist with apt"; fi

demo: install fmnist
	$(BIN)/fovea train dino_vittiny_fmnist

test: install fmnist
	$(BIN)/python -m mypy src/fovea
	$(BIN)/python -m pytest -q

test-all: install fmnist
	$(BIN)/python -m pytest -q -m ''

bench: install
	$(BIN)/python benchmarks/train_throughput.py dino_vittiny_fmnist

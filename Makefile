# Two commands do everything on a fresh machine (Debian/Ubuntu, Python 3.10+, root or sudo for apt-get):
#   make train   set up, then train and evaluate an HS-ResNet on Fashion-MNIST (the embedded default dataset)
#   make test    set up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
APT := $(shell command -v sudo >/dev/null 2>&1 && [ "$$(id -u)" != 0 ] && echo sudo) apt-get
PYTEST_ARGS ?= -n 2 -m "not slow"

.PHONY: install data train test lint
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

data: $(FMNIST)
$(FMNIST):
	$(APT) install -y dataset-fashion-mnist || ($(APT) update && $(APT) install -y dataset-fashion-mnist)

train: install data
	$(VENV)/bin/hsresnet train -c configs/fashion_mnist.yaml --output runs/fashion_mnist --overwrite

test: install data
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests && $(VENV)/bin/ruff format --check src tests

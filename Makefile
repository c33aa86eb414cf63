# Two entry points that work on a fresh machine with Python 3.11 and nothing installed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/tfrewrite: setup.cfg pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

.PHONY: demo test fixtures bench sweep
demo: $(BIN)/tfrewrite
	$(BIN)/tfrewrite fixtures/vgg_digits.tflite /tmp/vgg_digits_small.tflite --target-size 5 --verify

test: $(BIN)/tfrewrite
	$(BIN)/python -m pytest tests

fixtures: $(BIN)/tfrewrite
	$(BIN)/pip install -q -c constraints.txt -e '.[test,fixtures]'
	$(BIN)/python fixtures/make_fixtures.py

bench: $(BIN)/tfrewrite
	$(BIN)/pip install -q -c constraints.txt -e '.[test,bench]'
	$(BIN)/python bench/reproduce.py

# Every README option set on every fixture and odd model (tests/test_sweep.py; the test suite runs a small subset).
sweep: $(BIN)/tfrewrite
	TFREWRITE_SWEEP=full $(BIN)/python -m pytest tests/test_sweep.py -q -p no:warnings

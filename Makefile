# `make run` trains the default recipe; `make test` runs the test suite.
# Both create .venv (tools/bootstrap.sh) on first use.
PY := .venv/bin/python
RECIPE ?= protonet-omniglot-5w1s
# Training wall-time budget of `make run` in minutes (empty: the recipe's full iterations).
MINUTES ?= 8
# Real data beside the checkout (this project's machines); elsewhere set
# L2L_RECIPES_DATA or pass ARGS="--data-root DIR" / ARGS="--download".
export L2L_RECIPES_DATA ?= $(wildcard $(CURDIR)/../shared/data)

.PHONY: setup run test
setup:
	@bash tools/bootstrap.sh

run: setup
	$(PY) -m l2l_recipes.cli run $(RECIPE) $(if $(MINUTES),--max-minutes $(MINUTES)) $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

# The two entry points of the README:
#   make app    set up and run the explorer (default model, a bundled photo) as a web app
#   make test   set up and run the whole test suite (notebooks and browser tests included)
VENV ?= .venv
ARGS ?=

.PHONY: app test setup-app setup-test

setup-app:
	bash scripts/setup.sh app

setup-test:
	bash scripts/setup.sh test
	bash scripts/install-browser.sh

app: setup-app
	$(VENV)/bin/scorecam-explorer app $(ARGS)

test: setup-test
	$(VENV)/bin/python -m pytest $(ARGS)

# Everything a fresh Debian/Ubuntu machine with Python 3.11 needs, from this file alone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages FFCV's C extension compiles against (pip builds ffcv from source).
DEB_PKGS := pkg-config libturbojpeg0-dev libopencv-dev
# Pinned for the install here: these come from the machine's local package cache; pyproject.toml
# states the range the code supports.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@dpkg -s $(DEB_PKGS) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends $(DEB_PKGS); }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) -e '.[dev]'
	@touch $@

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m hjepa.demo

clean-venv:
	rm -rf $(VENV)

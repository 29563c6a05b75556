# make demo: run the bundled demo spec;  make test: lint and the test suite.
# Both create the virtual environment on first use and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch for the reference runtime and export; on a CUDA workstation: make TORCH=torch
TORCH ?= torch==2.13.0
# llama compiles llama.cpp on first install (about 5 minutes; pip caches the wheel): make EXTRAS=export,onnx,eval,serve,ray,dev skips it
EXTRAS ?= export,onnx,llama,eval,serve,ray,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# the committed demo checkpoint (sparc-engine train demo); its ONNX bundle is derived from it
DEMO_MODEL := demo/qwen3vl
DEMO_BUNDLE := models/demo-qwen3vl-onnx

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

$(DEMO_BUNDLE)/manifest.yaml: $(STAMP) $(DEMO_MODEL)/model.safetensors $(DEMO_MODEL)/perception-lora/adapter_model.safetensors
	rm -rf $(DEMO_BUNDLE)
	$(BIN)/sparc-engine export onnx --model $(DEMO_MODEL) --perception-lora $(DEMO_MODEL)/perception-lora --out $(DEMO_BUNDLE)

demo: $(DEMO_BUNDLE)/manifest.yaml
	$(BIN)/sparc-engine run specs/demo.yaml --save-viz out/demo.png

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) models out

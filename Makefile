# vchat top-level entry points. `make demo` and `make test` work on a fresh Debian
# machine as root: each installs what is missing (tools/install-deps.sh), then builds.
JOBS      ?= $(shell nproc)
BUILD     ?= build
BUILD_CUDA?= build-cuda
NVCC      := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)

.PHONY: all deps build build-cuda test bench demo clean gpu-pack gpu-check

all: build

deps:
	bash tools/install-deps.sh

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(BUILD) -j $(JOBS)

# The CUDA variant (cuBLAS, NCCL, sm_90) must always compile, even with no GPU here.
build-cuda: deps
ifneq ($(NVCC),)
	cmake -S . -B $(BUILD_CUDA) -DCMAKE_BUILD_TYPE=Release -DVCHAT_CUDA=ON -DCMAKE_CUDA_COMPILER=$(NVCC)
	cmake --build $(BUILD_CUDA) -j $(JOBS)
else
	@echo "build-cuda: no nvcc found (expected /usr/local/cuda/bin/nvcc); the CUDA variant was NOT built" >&2
	@exit 1
endif

test: build build-cuda
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 900

# GPU checks (docs/GPU.md). Here: build the CUDA variant, pack its binaries with the Debian
# libraries they load into .gpu-pack/, and rehearse starting them from the pack alone.
gpu-pack: build-cuda
	bash tools/gpu/pack.sh $(BUILD_CUDA)
	bash tools/gpu/rehearse.sh
# On a lent GPU machine (the device tool, carrying .gpu-pack): the op suite, sanitizers,
# one summary table last. Needs no build and no Debian package there.
gpu-check:
	bash tools/gpu/check.sh

bench: build
	bash bench/run_step_bench.sh

# End to end on a small embedded default: synthetic visual task → tokenizer → shards →
# tiny model trained on 2 MPI ranks → validation loss and held-out answer accuracy.
demo: build
	bash tools/demo.sh $(BUILD)

clean:
	rm -rf $(BUILD) $(BUILD_CUDA)

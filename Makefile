# vchat top-level entry points. `make demo` and `make test` work on a fresh Debian
# machine as root: each installs what is missing (tools/install-deps.sh), then builds.
JOBS      ?= $(shell nproc)
BUILD     ?= build
BUILD_CUDA?= build-cuda
NVCC      := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
# The Python oracles (Debian's torch 1.13 and the .venv built on it) must not see packages a
# user installed under ~/.local: a numpy 2 there broke torch's import in every oracle test.
export PYTHONNOUSERSITE := 1

.PHONY: all deps build build-cuda test bench demo clean gpu-pack gpu-check

all: build

deps:
	bash tools/install-deps.sh

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(BUILD) -j $(JOBS)

# The CUDA variant (cuBLAS, NCCL; for the GPUs of CUDA_ARCHS, by default A100 and H100/H200:
# CMakeLists.txt VCHAT_CUDA_ARCHS) must always compile, even with no GPU here. It
# builds what runs on a GPU machine (the library with its kernels, the apps, the GPU suite,
# the benchmarks), not the CPU test binaries again: those test the same sources in build/,
# and compiling them twice was half of this build's time on CI's 2 cores. The one CPU test
# line that depends on the variant (test_precision: built_with_cuda) has a GPU-suite twin.
# `make build-cuda CUDA_TARGETS=all` builds everything.
CUDA_ARCHS ?= 80;90
CUDA_TARGETS ?= vchat-train vchat-ckpt vchat-chat vchat-prep vchat-synth vchat_cuda_tests \
                vchat-bench-step vchat-bench-attn vchat-bench-comm vchat-bench-ckpt-io \
                vchat-bench-chat vchat-bench-loader
build-cuda: deps
ifneq ($(NVCC),)
	cmake -S . -B $(BUILD_CUDA) -DCMAKE_BUILD_TYPE=Release -DVCHAT_CUDA=ON -DCMAKE_CUDA_COMPILER=$(NVCC) \
	      -DVCHAT_CUDA_ARCHS="$(CUDA_ARCHS)"
	cmake --build $(BUILD_CUDA) -j $(JOBS) $(if $(filter all,$(CUDA_TARGETS)),,--target $(CUDA_TARGETS))
else
	@echo "build-cuda: no nvcc found (expected /usr/local/cuda/bin/nvcc); the CUDA variant was NOT built" >&2
	@exit 1
endif

# The CUDA variant compiles at the lowest priority while the CPU tests run: it takes only
# the cycles they leave (serial end-to-end tests, waits on Slurm's timers), so it costs
# `make test` little wall time; a failed CUDA build still fails the target (its log is shown).
# Last, every kernel the emulated suite launched is checked against the CUDA build's ptxas
# report: its block's registers and its shared memory must fit an SM (tools/gpu/launch_resources.py).
test: build
	@rm -f $(abspath $(BUILD_CUDA)).log $(abspath $(BUILD_CUDA)).rc $(abspath $(BUILD))/emulated-launches.log
	@( nice -n 19 $(MAKE) --no-print-directory build-cuda > $(abspath $(BUILD_CUDA)).log 2>&1; echo $$? > $(abspath $(BUILD_CUDA)).rc ) & \
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 900; tests=$$?; \
	wait; cuda=$$(cat $(abspath $(BUILD_CUDA)).rc 2>/dev/null || echo 1); \
	tail -n 3 $(abspath $(BUILD_CUDA)).log; \
	if [ "$$cuda" != 0 ]; then echo "make test: the CUDA variant did not build (exit $$cuda): $(abspath $(BUILD_CUDA)).log" >&2; tail -n 40 $(abspath $(BUILD_CUDA)).log >&2; fi; \
	launch=0; if [ "$$cuda" = 0 ]; then python3 $(CURDIR)/tools/gpu/launch_resources.py $(abspath $(BUILD))/emulated-launches.log $(abspath $(BUILD_CUDA)) || launch=1; fi; \
	if [ "$$tests" != 0 ] || [ "$$cuda" != 0 ] || [ "$$launch" != 0 ]; then exit 1; fi; echo "make test: all tests passed, CUDA variant built, every kernel launch fits an SM"

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

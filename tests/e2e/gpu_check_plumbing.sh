#!/usr/bin/env bash
# The device check's own logic, here, so that a lent GPU's minutes are not spent finding a
# bug in it: tools/gpu/check.sh runs against a pack of stand-ins (scripts named as the
# packed binaries, nvidia-smi, compute-sanitizer, mpirun and PyTorch's python3, printing
# what the real ones print) and must
#   run A: record every selected stage (pass, a failure, "not selected"), take the figures,
#          the loss curves' margins and the steps' host lines out of the logs into their rows, not fail the check for a PyTorch
#          reference's failure (but fail it for the parity check's), pack every log into logs.tar.gz, print the table last, exit 0;
#   run B: fail the check for a vchat stage's failure, cut a stage that outlives the time
#          budget (HARD_S) at what was left and say so, skip the stages after it, and flag
#          a pack built from sources other than the tree's;
# and env.sh must turn Open MPI's CMA path off under gVisor (or when asked) and only there.
# Usage: gpu_check_plumbing.sh SOURCE_DIR
set -uo pipefail
SRC=$(cd "${1:?usage: gpu_check_plumbing.sh SOURCE_DIR}" && pwd)
T=$(mktemp -d); [[ -n ${KEEP:-} ]] && echo "gpu_check_plumbing: keeping $T"
trap '[[ -n ${KEEP:-} ]] || rm -rf "$T"' EXIT
fail() { echo "gpu_check_plumbing: FAIL: $*" >&2; exit 1; }

# --- the stand-ins
mkdir -p "$T/pack/bin" "$T/pack/tools" "$T/pack/mpi/usr/bin" "$T/path"
standin() {  # standin FILE BODY: an executable bash script
  printf '#!/usr/bin/env bash\n%s\n' "$2" > "$1"
  chmod +x "$1"
}
# The GPU suite: CudaComm fails (its filter names it), everything else passes.
standin "$T/pack/bin/vchat_cuda_tests" 'case "$*" in
  *CudaComm*) printf "[  FAILED  ] CudaComm.Broken (3 ms)\n[  PASSED  ] 6 tests.\n[  FAILED  ] 1 test, listed below:\n"
              printf "[  FAILED  ] CudaComm.Broken\n\n 1 FAILED TEST\n"; exit 1 ;;
  *CudaModel*) echo "[ curve    ] tiny: fp32 CPU 6.3 -> 4.1, bf16 device 6.3 -> 4.1; largest gap 0.40% at step 7"
               echo "[ curve    ] small: fp32 CPU 9.1 -> 6.0, bf16 device 9.1 -> 6.1; largest gap 1.10% at step 31"
               echo "[  PASSED  ] 7 tests." ;;
  *) echo "[  PASSED  ] 7 tests." ;;
esac'
standin "$T/pack/bin/vchat-bench-attn" 'case "$*" in
  *cuda-cores*) echo "vchat_attn_ms fwd=2.000 fwd_bwd=9.000" ;;
  *wmma*) echo "vchat_attn_ms fwd=1.500 fwd_bwd=4.000" ;;
  *atomic-dq*"--seq-len 2048"*) echo "vchat_attn_ms fwd=1.000 fwd_bwd=3.000" ;;
  *atomic-dq*) echo "vchat_attn_ms fwd=4.000 fwd_bwd=11.500" ;;
  *"--seq-len 2048"*) echo "vchat_attn_ms fwd=1.000 fwd_bwd=3.500" ;;
  *) echo "vchat_attn_ms fwd=4.000 fwd_bwd=13.250" ;;
esac'
# The step: writes the batch it was asked for; the 1B one hangs when STUB_HANG is set.
standin "$T/pack/bin/vchat-bench-step" 'out=""; prev=""
for a in "$@"; do [[ $prev == --batch-out ]] && out=$a; prev=$a; done
[[ -n ${STUB_HANG:-} && "$*" == *llama-1b* ]] && sleep 600
[[ -n $out ]] && echo batch > "$out"
case "$*" in
  *tiny.json*) echo "# host: 9.80 ms to enqueue a step (median), 700 launches a step (kernels and GEMMs), 14.0 us each"
               echo "vchat_step_ms median=11.50 min=11.00 iters=10 model_flops=2.000000e+12 mfu=0.1000 peak_tflops=989.4" ;;
  *small.json*) echo "vchat_step_ms median=21.50 min=21.00 iters=10 model_flops=3.000000e+13 mfu=0.2000 peak_tflops=989.4" ;;
  *) echo "# model=llama-1b-clip-l14-224 attention_backward=deterministic micro_batches=4 peak_gpu_mem_gib=41.25"
     echo "# host: 120.00 ms to enqueue a step (median), 9000 launches a step (kernels and GEMMs), 13.3 us each"
     echo "vchat_step_ms median=900.00 min=899.00 iters=3 model_flops=4.500000e+17 mfu=0.5100 peak_tflops=989.4" ;;
esac'
standin "$T/pack/bin/vchat-bench-comm" 'echo "| nccl | device | 1 | all_reduce | 64 | 1.0 |"'
standin "$T/pack/mpi/usr/bin/mpirun" 'while [[ $# -gt 0 && $1 != */bin/vchat* ]]; do shift; done; exec "$@"'
standin "$T/path/nvidia-smi" 'echo "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB"'
standin "$T/path/compute-sanitizer" 'while [[ $1 == --* ]]; do shift 2; done; exec "$@"'
# PyTorch's python3: the references print their figures; torch.compile's fails. A script
# on stdin (env.sh asking for the nvidia-* wheels' folders) prints nothing.
standin "$T/path/python3" 'case "$*" in
  *torch_parity.py*) if [[ -n ${STUB_PARITY_FAIL:-} ]]; then
                       echo "torch_parity: tiny default loss: the benchmark model differs from the oracle by 3e-03"
                       echo "torch_parity: FAIL: tiny default (above)"; exit 1
                     fi
                     echo "torch_parity: tiny-deep full: loss 6.2, 43 gradients agree"
                     echo "torch_parity: all 3 configs agree" ;;
  *gpu_torch_attn.py*"--seq-len 2048"*) echo "torch_attn_ms fwd=1.100 fwd_bwd=4.000" ;;
  *gpu_torch_attn.py*) echo "torch_attn_ms fwd=4.400 fwd_bwd=15.000" ;;
  *gpu_torch_step.py*"--mode compile"*) echo "Traceback: inductor failed" >&2; exit 1 ;;
  *gpu_torch_step.py*"--train default"*) echo "torch_step_ms median=14.00 min=13.00 mode=eager mfu=0.0800" ;;
  *gpu_torch_step.py*) echo "# torch 2.11.0 mode=eager micro_batches=4 loss=6.4 peak_mem_gib=52.5"
                       echo "torch_step_ms median=1500.00 min=1490.00 mode=eager mfu=0.3060" ;;
  -) cat > /dev/null ;;
  *) echo "stand-in python3: unexpected $*" >&2; exit 2 ;;
esac'
cp "$SRC"/tools/gpu/*.sh "$T/pack/tools/"
echo plumbing-test > "$T/pack/COMMIT"
echo 2.17 > "$T/pack/GLIBC_NEEDED"
# The sources the pack "was built from": the tree's, as pack.sh lists them.
(cd "$SRC" && git ls-files -co --exclude-standard -- tools/gpu bench | LC_ALL=C sort | xargs -d '\n' sha256sum) \
  > "$T/pack/SOURCES.sha256" || fail "could not list the tree's sources (not a git checkout?)"
tar -C "$T" -cJf "$T/pack.tar.xz" pack || fail "tar -cJ (xz) could not pack the stand-ins"

check() {  # check NAME [VAR=VALUE...]: runs check.sh with the stand-ins, OUT=$T/NAME
  local name=$1; shift
  mkdir -p "$T/$name"
  env PATH="$T/path:$PATH" VCHAT_GPU_PACK="$T/pack.tar.xz" OUT="$T/$name" "$@" \
    bash "$SRC/tools/gpu/check.sh" > "$T/$name/stdout" 2>&1
  echo $? > "$T/$name/rc"
}
row() {  # row RUN STAGE: the summary's row of that stage, "| stage | result | detail |"
  grep -E "^\| $2 \|" "$T/$1/summary.md" | tail -n 1
}
expect_row() {  # expect_row RUN STAGE RESULT-REGEX [DETAIL-REGEX]
  local r
  r=$(row "$1" "$2")
  [[ -n $r ]] || fail "run $1: no row for $2 in summary.md"
  [[ $r =~ ^\|\ $2\ \|\ $3\ \| ]] || fail "run $1: $2's row is '$r', expected result /$3/"
  [[ -z ${4:-} || $r =~ $4 ]] || fail "run $1: $2's row is '$r', expected /$4/"
}

# --- run A: every stage but the layouts (they run vchat-train; tools/gpu/rehearse.sh runs them)
check A ONLY='^(ops|comm|model|torch-parity|attn-.*|step-.*|memcheck|racecheck|comm-nccl-1|comm-mpi-staged-2)$'
[[ $(cat "$T/A/rc") == 1 ]] || fail "run A: exit $(cat "$T/A/rc") with the comm stage failed, expected 1"
others=$(grep -E '^\| [^|]+ \| FAIL' "$T/A/summary.md" | grep -vE '^\| (comm|[a-z0-9-]*-torch-[a-z0-9-]*) \|')
[[ -z $others ]] || fail "run A: stages failed that should have passed: $others"
expect_row A machine - "H100 80GB HBM3, 580.159.04"
expect_row A pack-sources pass
expect_row A ops pass "PASSED"
expect_row A comm 'FAIL\(1\)' "1 FAILED TEST \(first: CudaComm.Broken\)"
expect_row A curves - "tiny: .*largest gap 0.40% at step 7;small: .*largest gap 1.10% at step 31 \|"
expect_row A layouts-staged "not selected"
expect_row A torch-parity pass "all 3 configs agree"
expect_row A step-torch-compile 'FAIL\(1\)'
expect_row A memcheck pass
expect_row A comm-mpi-staged-2 pass
expect_row A figures - "attn L2048 fwd\+bwd: vchat 3.500 ms \(atomic dQ 3.000; fwd 1.000, WMMA fwd 1.500\), torch flash 4.000 ms; L4096: vchat 13.250 ms \(atomic dQ 11.500\), torch 15.000 ms; 1B step MFU: vchat 0.5100, torch eager 0.3060, compile ; peak GPU memory GiB: vchat 41.25, torch eager 52.5, compile +\|"
# The steps' host lines as rows of their own (small's stand-in prints none: no row).
expect_row A step-vchat-host - "120.00 ms to enqueue a step \(median\), 9000 launches a step \(kernels and GEMMs\), 13.3 us each \|"
expect_row A step-tiny-vchat-host - "9.80 ms to enqueue a step \(median\), 700 launches"
[[ -z $(row A step-small-vchat-host) ]] || fail "run A: a host row for small, whose step printed no host line"
expect_row A figures-paper - "tiny vchat 11.50 ms, torch eager 14.00 ms; small vchat 21.50 ms, torch eager 14.00 ms"
[[ $(tail -n 1 "$T/A/stdout") =~ ^\|\ figures-paper\ \|\ -\ \| ]] || fail "run A: the table is not printed last: $(tail -n 2 "$T/A/stdout")"
logs=$(tar -tzf "$T/A/logs.tar.gz") || fail "run A: logs.tar.gz does not read"
for f in ops step-torch-compile; do  # (grep -q on tar's pipe would cut it short: SIGPIPE under pipefail)
  grep -qx "\./$f\.log" <<< "$logs" || fail "run A: logs.tar.gz holds no $f.log"
done

# The same without the failing vchat stage: a PyTorch reference's failure alone passes.
check A2 ONLY='^(ops|torch-parity|step-vchat|step-torch-.*)$'
[[ $(cat "$T/A2/rc") == 0 ]] || fail "run A2: exit $(cat "$T/A2/rc") with only torch.compile's reference failed, expected 0: $(cat "$T/A2/summary.md")"
expect_row A2 step-torch-compile 'FAIL\(1\)'

# A parity failure fails the check (the PyTorch figures would compare another model), and
# its row names what differed.
check A3 STUB_PARITY_FAIL=1 ONLY='^(torch-parity)$'
[[ $(cat "$T/A3/rc") == 1 ]] || fail "run A3: exit $(cat "$T/A3/rc") with torch-parity failed, expected 1"
expect_row A3 torch-parity 'FAIL\(1\)' "torch_parity: FAIL: tiny default"

# --- run B: the 1B step hangs past the budget; a source file differs from the pack's list.
sed -i '1s/^[0-9a-f]\{8\}/00000000/' "$T/pack/SOURCES.sha256"
tar -C "$T" -cJf "$T/pack.tar.xz" pack || fail "tar -cJ (xz) could not pack the stand-ins"
SECONDS=0
check B HARD_S=40 STUB_HANG=1 ONLY='^(ops|step-vchat|step-torch-eager|comm-nccl-1)$'
(( SECONDS < 75 )) || fail "run B took ${SECONDS} s: the 40 s budget did not hold"
[[ $(cat "$T/B/rc") == 1 ]] || fail "run B: exit $(cat "$T/B/rc"), expected 1"
expect_row B pack-sources FAIL "source files differ"
expect_row B ops pass
expect_row B step-vchat 'FAIL\(cut at [0-9]+ s by the 40 s budget\)'
expect_row B step-torch-eager skipped "no batch or model_flops from step-vchat"
expect_row B step-torch-compile "not selected"
expect_row B comm-nccl-1 skipped "over the 40 s budget"
# --- env.sh's MPI transport: under gVisor (a kernel that reports 4.4.0) or VCHAT_GPU_NO_CMA=1,
# vader's single-copy path (CMA, process_vm_readv) is off; elsewhere Open MPI's default stays.
mkdir -p "$T/gvisor"
standin "$T/gvisor/uname" 'echo 4.4.0'
cma() {  # cma [VAR=VALUE...]: what env.sh leaves in OMPI_MCA_btl_vader_single_copy_mechanism
  env "$@" bash -c 'source "$1/tools/env.sh"; vchat_gpu_env "$1"; echo "${OMPI_MCA_btl_vader_single_copy_mechanism-default}"' _ "$T/pack"
}
[[ $(cma PATH="$T/gvisor:$PATH") == none ]] || fail "env.sh under a 4.4.0 kernel (gVisor) leaves CMA on"
[[ $(cma VCHAT_GPU_NO_CMA=1) == none ]] || fail "env.sh with VCHAT_GPU_NO_CMA=1 leaves CMA on"
[[ $(uname -r) == 4.4.0* || $(cma) == default ]] || fail "env.sh turns CMA off on kernel $(uname -r)"
echo "gpu_check_plumbing: check.sh records, cuts, skips and summarizes as it should (runs A, A2, A3, B); env.sh turns CMA off under gVisor only"

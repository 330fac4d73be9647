#!/usr/bin/env python3
"""Would every kernel launch the emulated GPU suite made fit on an SM of each GPU built for?

  launch_resources.py LAUNCH_LOG BUILD_CUDA_DIR [--all]

LAUNCH_LOG: lines appended by the emulated CUDA runtime (VCHAT_EMU_LAUNCH_LOG, set by ctest
for the emulated tests): executable, its mtime, a kernel's offset in it, the largest block
(threads) and dynamic shared memory it was launched with, and the compute capability of the
emulated GPU it ran on (VCHAT_EMU_GPU; an H100's 90 by default). BUILD_CUDA_DIR: the CUDA
build, whose objects carry ptxas's per-kernel report for each architecture it compiled
(X.cu.o.resources, tools/gpu/nvcc_resources.sh; VCHAT_CUDA_ARCHS, by default sm_80 and sm_90).

For each kernel of vchat's (vchat::cuda::...) launched, and each architecture: its registers
there, allocated per warp in units of 256, times the warps of its largest block must fit the
SM's 65536 (else the launch fails with "too many resources requested for launch"); and its
static plus dynamic shared memory, as launched on an emulated GPU of that architecture (whose
opt-in limit the dispatch saw: an A100's 163 KiB, an H100's 227 KiB), must fit that limit.
Every architecture must have had launches on its emulated GPU. Prints a table, then fails
(exit 1) on any kernel that does not fit, and on any launched kernel with no ptxas report
(the two builds name their kernels alike once nvcc's per-file anonymous namespace is written
as g++ writes it). Only stdlib; binutils' nm and c++filt.
"""
import glob
import os
import re
import subprocess
import sys

REGS_PER_SM = 65536  # sm_80 to sm_120
# The shared memory a block may opt in to, by architecture (CUDA programming guide, "Compute
# capabilities"); the emulated runtime grants the same (tests/emu/sdk/cuda_runtime.cpp).
SMEM_OPTIN = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
REG_UNIT = 256       # registers are allocated per warp in units of 256


def demangle(names):
    if not names:
        return []
    out = subprocess.run(["c++filt"], input="\n".join(names) + "\n", capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def normalize(name):
    # nvcc names a file's anonymous namespace _GLOBAL__N__<hash>_<n>_<file>_cu_<hash>.
    name = re.sub(r"_GLOBAL__N__[0-9a-f]+_\d+_[A-Za-z0-9_]*?_cu_[0-9a-f]+", "(anonymous namespace)", name)
    return re.sub(r"\s+", " ", name).strip()


def ptxas_reports(build_cuda):
    """{(normalized kernel name, arch): {regs, smem, spill, stack}} from every X.o.resources."""
    files = glob.glob(os.path.join(build_cuda, "**", "*.o.resources"), recursive=True)
    kernels, stacks = {}, {}
    for path in files:
        entry = props = None
        arch = 0
        for line in open(path):
            m = re.match(r"ptxas info\s*: Compiling entry function '([^']+)' for 'sm_(\d+)[a-z]?'", line)
            if m:
                entry, arch = m.group(1), int(m.group(2))
                continue
            m = re.match(r"ptxas info\s*: Function properties for (\S+)", line)
            if m:
                props = m.group(1)
                continue
            m = re.match(r"\s+(\d+) bytes stack frame, (\d+) bytes spill stores", line)
            if m and props:
                stacks[(props, arch)] = (int(m.group(1)), int(m.group(2)))
                continue
            m = re.match(r"ptxas info\s*: Used (\d+) registers(.*)", line)
            if m and entry:
                smem = re.search(r"(\d+) bytes smem", m.group(2))
                kernels[(entry, arch)] = {"regs": int(m.group(1)), "smem": int(smem.group(1)) if smem else 0}
                entry = None
    for key, k in kernels.items():
        k["stack"], k["spill"] = stacks.get(key, (0, 0))
    mangled = sorted({m for m, _ in kernels})
    plain = dict(zip(mangled, (normalize(d) for d in demangle(mangled))))
    return {(plain[m], arch): k for (m, arch), k in kernels.items()}, len(files)


def launches(log):
    """{(normalized kernel name, emulated GPU's compute capability): (threads, dynamic smem)},
    the largest of each, from current executables."""
    by_exe = {}
    for line in open(log):
        parts = line.split()
        if len(parts) == 5:
            parts.append("90")  # before the emulated GPU was named: an H100
        if len(parts) != 6:
            continue
        exe, mtime, offset, threads, smem, cc = parts
        try:
            if int(os.stat(exe).st_mtime) != int(mtime):
                continue  # from an older build of it: its offsets name other code
        except OSError:
            continue
        by_exe.setdefault(exe, []).append((int(offset, 16), int(threads), int(smem), int(cc)))
    found = {}
    for exe, recs in by_exe.items():
        symbols = {}
        nm = subprocess.run(["nm", "--defined-only", exe], capture_output=True, text=True, check=True)
        for line in nm.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3:
                symbols[int(parts[0], 16)] = parts[2]
        wanted = sorted({rec[0] for rec in recs if rec[0] in symbols})
        names = dict(zip(wanted, demangle([symbols[o] for o in wanted])))
        for off, threads, smem, cc in recs:
            name = normalize(names.get(off, ""))
            if not qualified(name).startswith("vchat::cuda::"):
                continue  # the emulator's own test kernels
            t, s = found.get((name, cc), (0, 0))
            found[(name, cc)] = (max(t, threads), max(s, smem))
    return found


def qualified(name):
    """The qualified name without return type, anonymous namespaces or parameters."""
    base = name.replace("(anonymous namespace)::", "").split("(")[0]
    return base[5:] if base.startswith("void ") else base


def short(name, width=70):
    base = qualified(name).replace("vchat::cuda::", "")
    return base if len(base) <= width else base[: width - 3] + "..."


def main():
    args = [a for a in sys.argv[1:] if a != "--all"]
    if len(args) != 2:
        print(__doc__)
        return 2
    log, build_cuda = args
    show = None if "--all" in sys.argv else 12  # the tightest; --all: every kernel
    if not os.path.exists(log):
        print(f"launch_resources: no launch log {log}: run the emulated tests (ctest -L emulated) first")
        return 1
    reports, nfiles = ptxas_reports(build_cuda)
    if nfiles == 0:
        print(f"launch_resources: no ptxas reports (*.o.resources) under {build_cuda}: "
              "its CUDA objects predate tools/gpu/nvcc_resources.sh; rebuild it (rm -rf it, make build-cuda)")
        return 1
    launched = launches(log)
    if not launched:
        print(f"launch_resources: {log} names no kernel of the current emulated binaries")
        return 1
    archs = sorted({arch for _, arch in reports})
    unknown = [a for a in archs if a not in SMEM_OPTIN]
    if unknown:
        print(f"launch_resources: no shared-memory limit known for sm_{unknown[0]}: add it to SMEM_OPTIN")
        return 1
    names = sorted({name for name, _ in launched})
    rows, bad, unmatched, unlaunched_archs = [], [], [], []
    for name in names:
        if not any((name, arch) in reports for arch in archs):
            unmatched.append(name)
            continue
        # The block size is the dispatch's, whatever the GPU: the largest on any.
        threads = max(t for (n, _), (t, _) in launched.items() if n == name)
        for arch in archs:
            k = reports.get((name, arch))
            if k is None:
                unmatched.append(f"{name} (sm_{arch})")
                continue
            warps = -(-threads // 32)
            per_warp = -(-k["regs"] * 32 // REG_UNIT) * REG_UNIT
            regs_block = per_warp * warps
            # Shared memory as the dispatch chose it on this architecture's emulated GPU
            # (None: not launched there; its registers are still checked).
            dyn = launched.get((name, arch), (0, None))[1]
            smem_ok = dyn is None or k["smem"] + dyn <= SMEM_OPTIN[arch]
            fits = regs_block <= REGS_PER_SM and smem_ok
            rows.append((regs_block / REGS_PER_SM, short(name, 62), arch, threads, k["regs"], regs_block, k["smem"], dyn,
                         k["spill"], fits))
            if not fits:
                bad.append(f"{name} (sm_{arch})")
    for arch in archs:
        if not any(cc == arch for _, cc in launched):
            unlaunched_archs.append(arch)
    rows.sort(key=lambda r: (r[9], -r[0]))  # what does not fit first, then by register share
    print(f"{'kernel (the tightest by registers)':62} {'arch':>6} {'threads':>7} {'regs':>4} {'regs/block':>12} "
          f"{'smem static+dyn':>16} {'spill':>5}")
    for _, n, arch, threads, regs, rb, st, dyn, spill, fits in rows[:show] + [r for r in rows[show:] if not r[9]]:
        flag = "" if fits else "  <-- does not fit an SM"
        dyn_s = "-" if dyn is None else str(dyn)
        print(f"{n:62} {'sm_' + str(arch):>6} {threads:7d} {regs:4d} {rb:6d}/64Ki {st:7d}+{dyn_s:<8} {spill:5d}{flag}")
    for arch in archs:
        mine = [r for r in rows if r[2] == arch]
        print(f"launch_resources: sm_{arch}: {len(mine)} kernels' registers checked against ptxas, "
              f"{sum(r[7] is not None for r in mine)} of them also their shared memory as launched on an emulated "
              f"sm_{arch} ({SMEM_OPTIN[arch]} bytes a block)")
    print(f"launch_resources: {len(names)} kernels launched by the emulated suite: {len(bad)} do not fit, "
          f"{len(unmatched)} without a ptxas report")
    for n in unmatched:
        print(f"  no ptxas report for: {n}")
    for arch in unlaunched_archs:
        print(f"  no launch on an emulated sm_{arch} GPU (VCHAT_EMU_GPU={arch}): its shared memory went unchecked; "
              f"run the emulated suite (ctest -L emulated)")
    return 1 if bad or unmatched or unlaunched_archs else 0


if __name__ == "__main__":
    sys.exit(main())

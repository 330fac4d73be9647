#!/usr/bin/env python3
"""Would every kernel launch the emulated GPU suite made fit on an H100/H200 SM?

  launch_resources.py LAUNCH_LOG BUILD_CUDA_DIR [--all]

LAUNCH_LOG: lines appended by the emulated CUDA runtime (VCHAT_EMU_LAUNCH_LOG, set by ctest
for the emulated tests): executable, its mtime, a kernel's offset in it, the largest block
(threads) and dynamic shared memory it was launched with. BUILD_CUDA_DIR: the CUDA build,
whose objects carry ptxas's per-kernel report (X.cu.o.resources, tools/gpu/nvcc_resources.sh).

For each kernel of vchat's (vchat::cuda::...) launched: its registers, allocated per warp in
units of 256, times its warps must fit the SM's 65536 (else the launch fails with "too many
resources requested for launch"); its static plus dynamic shared memory must fit the 227 KiB a
block may opt in to. Prints a table, then fails (exit 1) on any kernel that does not fit, and
on any launched kernel with no ptxas report (the two builds name their kernels alike once
nvcc's per-file anonymous namespace is written as g++ writes it). Only stdlib; binutils'
nm and c++filt.
"""
import glob
import os
import re
import subprocess
import sys

REGS_PER_SM = 65536
SMEM_OPTIN = 232448  # 227 KiB
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
    """{normalized kernel name: {regs, smem, spill, stack}} from every X.o.resources."""
    files = glob.glob(os.path.join(build_cuda, "**", "*.o.resources"), recursive=True)
    kernels, stacks = {}, {}
    for path in files:
        entry = props = None
        for line in open(path):
            m = re.match(r"ptxas info\s*: Compiling entry function '([^']+)'", line)
            if m:
                entry = m.group(1)
                continue
            m = re.match(r"ptxas info\s*: Function properties for (\S+)", line)
            if m:
                props = m.group(1)
                continue
            m = re.match(r"\s+(\d+) bytes stack frame, (\d+) bytes spill stores", line)
            if m and props:
                stacks[props] = (int(m.group(1)), int(m.group(2)))
                continue
            m = re.match(r"ptxas info\s*: Used (\d+) registers(.*)", line)
            if m and entry:
                smem = re.search(r"(\d+) bytes smem", m.group(2))
                kernels[entry] = {"regs": int(m.group(1)), "smem": int(smem.group(1)) if smem else 0}
                entry = None
    for mangled, k in kernels.items():
        k["stack"], k["spill"] = stacks.get(mangled, (0, 0))
    names = list(kernels)
    return {normalize(d): kernels[m] for m, d in zip(names, demangle(names))}, len(files)


def launches(log):
    """{normalized kernel name: (threads, dynamic smem)}, the largest of each, from current executables."""
    by_exe = {}
    for line in open(log):
        parts = line.split()
        if len(parts) != 5:
            continue
        exe, mtime, offset, threads, smem = parts
        try:
            if int(os.stat(exe).st_mtime) != int(mtime):
                continue  # from an older build of it: its offsets name other code
        except OSError:
            continue
        by_exe.setdefault(exe, []).append((int(offset, 16), int(threads), int(smem)))
    found = {}
    for exe, recs in by_exe.items():
        symbols = {}
        nm = subprocess.run(["nm", "--defined-only", exe], capture_output=True, text=True, check=True)
        for line in nm.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3:
                symbols[int(parts[0], 16)] = parts[2]
        wanted = sorted({off for off, _, _ in recs if off in symbols})
        names = dict(zip(wanted, demangle([symbols[o] for o in wanted])))
        for off, threads, smem in recs:
            name = normalize(names.get(off, ""))
            if not qualified(name).startswith("vchat::cuda::"):
                continue  # the emulator's own test kernels
            t, s = found.get(name, (0, 0))
            found[name] = (max(t, threads), max(s, smem))
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
    rows, bad, unmatched = [], [], []
    for name, (threads, dyn) in sorted(launched.items()):
        k = reports.get(name)
        if k is None:
            unmatched.append(name)
            continue
        warps = -(-threads // 32)
        per_warp = -(-k["regs"] * 32 // REG_UNIT) * REG_UNIT
        regs_block = per_warp * warps
        smem = k["smem"] + dyn
        fits = regs_block <= REGS_PER_SM and smem <= SMEM_OPTIN
        rows.append((regs_block / REGS_PER_SM, short(name), threads, k["regs"], regs_block, k["smem"], dyn, k["spill"], fits))
        if not fits:
            bad.append(name)
    rows.sort(key=lambda r: (r[8], -r[0]))  # what does not fit first, then by register share
    print(f"{'kernel (the tightest by registers)':70} {'threads':>7} {'regs':>4} {'regs/block':>12} "
          f"{'smem static+dyn':>16} {'spill':>5}")
    for _, n, threads, regs, rb, st, dyn, spill, fits in rows[:show] + [r for r in rows[show:] if not r[8]]:
        flag = "" if fits else "  <-- does not fit an SM"
        print(f"{n:70} {threads:7d} {regs:4d} {rb:6d}/64Ki {st:7d}+{dyn:<8d} {spill:5d}{flag}")
    print(f"launch_resources: {len(rows)} kernels launched by the emulated suite checked against ptxas (sm_90): "
          f"{len(bad)} do not fit, {len(unmatched)} without a ptxas report")
    for n in unmatched:
        print(f"  no ptxas report for: {n}")
    return 1 if bad or unmatched else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Instruction counts of a kernel's main loop, per path, from its SASS (no GPU needed).

Our attention kernels issue, not multiply, at their limit on Hopper: with mma.sync every
tensor-core instruction has several others beside it, so the count of instructions one
iteration of the main loop issues per warp is the figure to drive down where no GPU is lent
to measure time (docs/GPU.md, "Instruction budget").

Input: `cuobjdump -sass` output (tools/gpu/sass_counts.sh makes it). For each function whose
mangled name matches a pattern, the main loop is the smallest backward-branch range that
holds every HMMA of the function. Each path through one iteration (branch taken or not at
each predicated BRA; BRA.DIV, the compiler's divergence fallback, taken as not diverging) is
counted: instructions issued and HMMA among them, grouped by HMMA count, with the opcodes
of the longest path of each group; then the forks, conditional branches whose two sides lead
to iterations of different length (a kernel's per-tile choice: tile kind, prefetch, skip),
with the longest iteration through each side. Local-memory accesses (spills) inside the loop
are listed.

  sass_loops.py DUMP.sass PATTERN...    e.g. 'flash_fwd_mmaILi128ELb1'
"""
import collections
import re
import sys

INSTR = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
FUNC = re.compile(r"^\s+Function : (\S+)")


def functions(text):
    """{mangled name: [(address, instruction text)]} of a cuobjdump -sass dump."""
    out, name = {}, None
    for line in text.splitlines():
        m = FUNC.match(line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = INSTR.match(line)
        if m and name:
            out[name].append((int(m.group(1), 16), m.group(2)))
    return out


def opcode(ins):
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]


def branch(ins):
    """(target, conditional, divergence fallback) of a BRA, else None."""
    m = re.match(r"^(@!?U?P\w+\s+)?BRA(\S*)\s+(.*)$", ins)
    if not m:
        return None
    t = re.search(r"0x([0-9a-f]+)\s*$", m.group(3))
    if not t:
        return None
    # Conditional: a guard predicate (@P0 BRA) or a predicate operand (BRA.U !UP0, target).
    conditional = m.group(1) is not None or re.match(r"!?U?P\w+\s*,", m.group(3)) is not None
    return int(t.group(1), 16), conditional, ".DIV" in m.group(2)


def main_loop(code):
    """(first, last) addresses of the smallest backward branch range holding every HMMA."""
    hmma = [a for a, t in code if opcode(t) == "HMMA"]
    if not hmma:
        return None
    best = None
    for a, t in code:
        b = branch(t)
        if b and b[0] <= a and b[0] <= min(hmma) and a >= max(hmma):
            if best is None or a - b[0] < best[1] - best[0]:
                best = (b[0], a)
    return best


def next_instructions(code, index, i):
    """Indices that may follow instruction i within an iteration (fall-through first)."""
    a, t = code[i]
    if opcode(t) == "EXIT" and not t.startswith("@"):
        return []
    b = branch(t)
    if not b:
        return [i + 1]
    target, conditional, divergence = b
    if divergence or target <= a:  # divergence fallback; inner back edge: not taken
        return [i + 1]
    return [i + 1, index[target]] if conditional else [index[target]]


def forks(code, first, last, threshold=64):
    """The conditional branches whose two sides lead to iterations of different length:
    [(address, longest iteration not taking it, longest taking it)] where they differ by at
    least `threshold` instructions (a kernel's per-tile choices, not its small conditions)."""
    index = {a: i for i, (a, _) in enumerate(code)}
    start, end = index[first], index[last]
    into = {start: 1}  # longest path from the loop head to i, i included
    for i in range(start, end + 1):
        if i in into:
            for j in next_instructions(code, index, i):
                if start <= j <= end:
                    into[j] = max(into.get(j, 0), into[i] + 1)
    out = {end: 1}  # longest path from i to the back edge, i included
    for i in range(end - 1, start - 1, -1):
        tails = [out[j] for j in next_instructions(code, index, i) if start <= j <= end and j in out]
        if tails:
            out[i] = 1 + max(tails)
    found = []
    for i in range(start, end):
        nxt = next_instructions(code, index, i)
        if i not in into or len(nxt) != 2 or not all(start <= j <= end and j in out for j in nxt):
            continue
        fall, taken = (into[i] + out[j] for j in nxt)
        if abs(fall - taken) >= threshold:
            found.append((code[i][0], fall, taken))
    return found


def iteration_paths(code, first, last):
    """The paths of one iteration from `first` to the back edge at `last`, summarized.

    With inner back edges not taken every edge points forward, so the paths form a DAG in
    address order, counted from the back edge down: returns {HMMA count: (path count,
    shortest, longest, instruction indices of a longest path)}.
    """
    index = {a: i for i, (a, _) in enumerate(code)}
    start, end = index[first], index[last]

    successors = lambda i: next_instructions(code, index, i)

    # table[i]: {HMMA count from i on: [paths, shortest, longest, next index on a longest]}
    def hmma(i):
        return int(opcode(code[i][1]) == "HMMA")

    table = {}
    for i in range(end, start - 1, -1):
        row = {}
        if i == end:
            row[hmma(i)] = [1, 1, 1, None]
        else:
            for j in successors(i):
                if not start <= j <= end:
                    continue  # leaves the loop: not an iteration
                for hj, (count, short, long_, _) in table[j].items():
                    e = row.get(hj + hmma(i))
                    if e is None:
                        row[hj + hmma(i)] = [count, short + 1, long_ + 1, j]
                        continue
                    e[0] += count
                    e[1] = min(e[1], short + 1)
                    if long_ + 1 > e[2]:
                        e[2], e[3] = long_ + 1, j
        table[i] = row
    out = {}
    for h, (count, short, long_, _) in table[start].items():
        path, i, left = [start], start, h
        while i != end:  # along a longest path with h HMMA
            i, left = table[i][left][3], left - hmma(i)
            path.append(i)
        out[h] = (count, short, long_, path)
    return out


def report(name, code):
    loop = main_loop(code)
    if not loop:
        return f"{name}: no loop holding the HMMAs"
    first, last = loop
    groups = iteration_paths(code, first, last)
    lines = [f"{name}: loop {first:#x}-{last:#x}, {sum(1 for a, _ in code if first <= a <= last)} instructions, "
             f"{sum(g[0] for g in groups.values())} paths per iteration"]
    for h in sorted(groups):
        count, short, long_, path = groups[h]
        ops = collections.Counter(opcode(code[i][1]) for i in path)
        lines.append(f"  {h} HMMA: {short}..{long_} instructions ({count} paths); longest: " +
                     ", ".join(f"{k} {v}" for k, v in ops.most_common(12)))
    for a, fall, taken in forks(code, first, last):
        lines.append(f"  fork at {a:#x}: longest iteration {fall} instructions not taking it, {taken} taking it")
    spills = [a for a, t in code if first <= a <= last and re.match(r"(LDL|STL)", opcode(t))]
    if spills:
        lines.append(f"  local memory in the loop: {len(spills)} accesses at " + ", ".join(f"{a:#x}" for a in spills))
    return "\n".join(lines)


def main(argv):
    if len(argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    funcs = functions(open(argv[1]).read())
    found = 0
    for pattern in argv[2:]:
        for name, code in funcs.items():
            if re.search(pattern, name):
                found += 1
                print(report(name, code))
    if not found:
        print(f"no function in {argv[1]} matches {argv[2:]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

#!/usr/bin/env python3
"""tools/gpu/sass_loops.py on hand-written SASS whose paths are counted by hand."""
import os
import subprocess
import sys
import tempfile
import unittest

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "gpu", "sass_loops.py")

# A loop at 0x20..0x90 with one predicated branch: not taken, 7 instructions with 2 HMMA and
# a spill store; taken, 5 instructions with 1 HMMA. A divergence fallback (BRA.DIV, into the
# loop here) is not followed, which would make a third path; an unconditional BRA is. Then a function without HMMA.
DUMP = """
        code for sm_90
                Function : _Z6kernelv
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                   /* 0x00000a0000017a02 */
        /*0010*/                   ISETP.GE.AND P0, PT, R2, RZ, PT ;        /* 0x000000ff0200720c */
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;    /* 0x0000000c0804723c */
        /*0030*/               @P0 BRA 0x70 ;                              /* 0x0000000000000947 */
        /*0040*/                   BRA.DIV UR4, 0x70 ;                      /* 0x0000000000000947 */
        /*0050*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;    /* 0x0000000c0804723c */
        /*0060*/                   STL [R1], R4 ;                           /* 0x0000000401007387 */
        /*0065*/                   BRA 0x80 ;                               /* 0x0000000000007947 */
        /*0070*/                   FADD R4, R4, R5 ;                        /* 0x0000000504047221 */
        /*0080*/                   IADD3 R2, R2, 0x1, RZ ;                  /* 0x0000000102027810 */
        /*0090*/               @P1 BRA 0x20 ;                              /* 0x0000000000001947 */
        /*00a0*/                   EXIT ;                                   /* 0x000000000000794d */
                ..........
                Function : _Z5plainv
        /*0000*/                   FADD R4, R4, R5 ;                        /* 0x0000000504047221 */
        /*0010*/                   EXIT ;                                   /* 0x000000000000794d */
"""


def run(*patterns):
    with tempfile.NamedTemporaryFile("w", suffix=".sass", delete=False) as f:
        f.write(DUMP)
    try:
        return subprocess.run([sys.executable, TOOL, f.name, *patterns], capture_output=True, text=True)
    finally:
        os.unlink(f.name)


class SassLoops(unittest.TestCase):
    def test_paths_of_one_iteration(self):
        r = run("kernel")
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.splitlines()
        self.assertEqual(lines[0], "_Z6kernelv: loop 0x20-0x90, 9 instructions, 2 paths per iteration")
        self.assertTrue(lines[1].startswith("  1 HMMA: 5..5 instructions (1 paths); longest: "), lines[1])
        self.assertIn("FADD 1", lines[1])
        self.assertTrue(lines[2].startswith("  2 HMMA: 8..8 instructions (1 paths); longest: "), lines[2])
        self.assertIn("HMMA 2", lines[2])
        self.assertEqual(lines[3], "  local memory in the loop: 1 accesses at 0x60")

    def test_forks_report_the_longest_iteration_through_each_side(self):
        sys.path.insert(0, os.path.dirname(TOOL))
        import sass_loops
        code = sass_loops.functions(DUMP)["_Z6kernelv"]
        # The branch at 0x30: not taken, 8 instructions; taken, 5. BRA.DIV is no fork.
        self.assertEqual(sass_loops.forks(code, 0x20, 0x90, threshold=2), [(0x30, 8, 5)])
        self.assertEqual(sass_loops.forks(code, 0x20, 0x90, threshold=4), [])

    def test_branch_forms(self):
        sys.path.insert(0, os.path.dirname(TOOL))
        import sass_loops
        self.assertEqual(sass_loops.branch("@!P2 BRA 0x70"), (0x70, True, False))
        self.assertEqual(sass_loops.branch("BRA.U !UP0, 0x70"), (0x70, True, False))
        self.assertEqual(sass_loops.branch("BRA 0x80"), (0x80, False, False))
        self.assertEqual(sass_loops.branch("BRA.DIV UR4, 0x70"), (0x70, False, True))
        self.assertIsNone(sass_loops.branch("HMMA.16816.F32.BF16 R4, R8, R12, R4"))

    def test_a_function_without_tensor_core_instructions(self):
        r = run("plain")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "_Z5plainv: no loop holding the HMMAs")

    def test_no_match_is_an_error(self):
        r = run("absent")
        self.assertEqual(r.returncode, 1)
        self.assertIn("matches", r.stderr)


if __name__ == "__main__":
    unittest.main()

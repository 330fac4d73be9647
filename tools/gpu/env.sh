# Sourced by check.sh and rehearse.sh: the library path of a packed run. The pack's own
# libraries first, then the CUDA toolkit's and NCCL's wherever this machine has them (the
# toolkit under /usr/local/cuda*, or the nvidia-* Python wheels next to PyTorch).
# Sets PACK (the unpacked pack) and LD_LIBRARY_PATH; prints nothing. Sourcing it twice
# (check.sh, then layouts.sh) only repeats directories.
vchat_gpu_env() {
  local pack=$1 dirs=() d
  PACK=$pack
  dirs+=("$pack/lib")
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/lib; do
    [[ -d $d ]] && dirs+=("$d")
  done
  # pip's nvidia-* wheels (PyTorch's CUDA libraries) hold libnccl.so.2 and cuBLAS too.
  if command -v python3 >/dev/null; then
    while read -r d; do [[ -d $d ]] && dirs+=("$d"); done < <(python3 - 2>/dev/null <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for lib in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        print(lib)
PY
    )
  fi
  # Then the driver's folder of NVIDIA's container runtimes (libcuda.so.1 may be found only
  # there) and whatever the machine had: the pack comes first, nothing is dropped.
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do [[ -d $d ]] && dirs+=("$d"); done
  [[ -n ${LD_LIBRARY_PATH-} ]] && dirs+=("$LD_LIBRARY_PATH")
  LD_LIBRARY_PATH=$(IFS=:; echo "${dirs[*]}")
  # The packed Open MPI, relocated: every install directory it would look in, under the pack.
  local m=$pack/mpi arch=x86_64-linux-gnu
  export OPAL_PREFIX=$m/usr OPAL_EXEC_PREFIX=$m/usr OPAL_BINDIR=$m/usr/bin OPAL_LIBDIR=$m/usr/lib/$arch/openmpi/lib
  export OPAL_PKGLIBDIR=$m/usr/lib/$arch/openmpi/lib/openmpi3 OPAL_DATAROOTDIR=$m/usr/share OPAL_DATADIR=$m/usr/share
  export OPAL_PKGDATADIR=$m/usr/share/openmpi OPAL_SYSCONFDIR=$m/etc/openmpi
  export PMIX_PREFIX=$m/pmix2 PMIX_EXEC_PREFIX=$m/pmix2 PMIX_LIBDIR=$m/pmix2/lib PMIX_PKGLIBDIR=$m/pmix2/lib/pmix
  # hwloc's optional plugins (PCI, OpenCL, X11, libxml2 topology sources) are not carried:
  # an empty plugin directory, so it uses its built-in discovery.
  mkdir -p "$m/hwloc-plugins"
  export HWLOC_PLUGINS_PATH=$m/hwloc-plugins
  export PATH=$m/usr/bin:$PATH OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  # Under gVisor (one lent kind has run under it: its kernel reports 4.4.0), process_vm_readv
  # may be missing, and vader's single-copy path (CMA) then fails a large message with "Read
  # -1, expected N, errno = 38": there messages go through the shared segment instead.
  # (VCHAT_GPU_NO_CMA=1 forces it, to rehearse here.)
  if [[ ${VCHAT_GPU_NO_CMA-} == 1 || $(uname -r) == 4.4.0* ]]; then
    export OMPI_MCA_btl_vader_single_copy_mechanism=none
  fi
  # mpirun as the GPU checks launch it: every rank gets the relocation above.
  # ob1 over shared memory: the same transport here and there, whatever UCX or libfabric
  # would find (or probe for, slowly) on the lent machine.
  MPIRUN=(mpirun --oversubscribe --bind-to none --mca pml ob1 --mca btl self,vader -x LD_LIBRARY_PATH -x HWLOC_PLUGINS_PATH -x PMIX_PREFIX
          -x PMIX_EXEC_PREFIX -x PMIX_LIBDIR -x PMIX_PKGLIBDIR -x VCHAT_SOURCE_DIR)
  export PACK LD_LIBRARY_PATH
}

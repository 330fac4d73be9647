#!/usr/bin/env bash
# Packs what the GPU check needs onto a lent machine (a bare H200 with the NVIDIA driver,
# the CUDA 13 toolkit and PyTorch, but none of our Debian libraries and no network) into
# .gpu-pack/ (git-ignored; the device call carries it):
#   pack.tar.xz  the CUDA build's test and benchmark binaries and vchat-train/vchat-ckpt,
#                Debian's Open MPI (mpirun, its components and help files, PMIx's, relocated
#                through OPAL_PREFIX and friends: tools/gpu/env.sh), the shared libraries all
#                of these load from Debian (not glibc, not the driver, not the CUDA toolkit's
#                cuBLAS/cudart/NCCL, which the machine has and which are too large to carry),
#                and tools/gpu/ itself.
# Usage: tools/gpu/pack.sh [BUILD_DIR=build-cuda]. Then tools/gpu/rehearse.sh checks here
# that the packed binaries start with nothing but the pack and the toolkit on the path.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${1:-$ROOT/build-cuda}
OUTDIR=$ROOT/.gpu-pack
BINS=(vchat_cuda_tests vchat-bench-step vchat-bench-attn vchat-bench-comm vchat-train vchat-ckpt)
ARCH=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
OMPI_LIB=/usr/lib/$ARCH/openmpi/lib
PMIX=/usr/lib/$ARCH/pmix2
# Libraries the lent machine provides (glibc and the loader, the driver, the CUDA toolkit).
# All of glibc's stay out, libresolv and the NSS modules included: they import glibc's
# GLIBC_PRIVATE symbols, which only the glibc they were built with defines.
SYSTEM_RE='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libresolv\.so|libnss_|libanl\.so|libutil\.so|libnsl\.so|libmvec\.so|libthread_db\.so|libBrokenLocale\.so|libcuda\.so|libcudart\.so|libcublas\.so|libcublasLt\.so|libnccl\.so)'

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/pack/bin" "$stage/pack/lib" "$stage/pack/tools"
# Every library the dynamic loader resolves for a binary or plugin, by its soname.
pack_libs_of() {
  ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r soname path; do
    [[ $soname =~ $SYSTEM_RE ]] && continue
    [[ -e $stage/pack/lib/$soname ]] || cp -L "$path" "$stage/pack/lib/$soname"
  done
}
for b in "${BINS[@]}"; do
  [[ -x $BUILD/tests/$b || -x $BUILD/$b ]] || { echo "pack: $b not built in $BUILD (run make build-cuda)" >&2; exit 1; }
  src=$BUILD/$b; [[ -x $src ]] || src=$BUILD/tests/$b
  cp "$src" "$stage/pack/bin/"
  pack_libs_of "$src"
done
# Open MPI as Debian installs it, under pack/mpi with the same layout below the prefix, so
# OPAL_PREFIX relocates it; PMIx likewise (PMIX_PREFIX and friends: env.sh).
M=$stage/pack/mpi
mkdir -p "$M/usr/bin" "$M/usr/lib/$ARCH/openmpi/lib" "$M/usr/share" "$M/etc" "$M/pmix2/lib"
cp /usr/bin/orterun /usr/bin/orted "$M/usr/bin/"
ln -s orterun "$M/usr/bin/mpirun"
cp -r "$OMPI_LIB/openmpi3" "$M/usr/lib/$ARCH/openmpi/lib/"
cp -r /usr/share/openmpi "$M/usr/share/"
cp -r /etc/openmpi "$M/etc/"
cp -r "$PMIX/lib/pmix" "$M/pmix2/lib/"
cp -r "$PMIX/share" "$M/pmix2/"
for f in "$M"/usr/bin/orterun "$M"/usr/bin/orted "$M"/usr/lib/$ARCH/openmpi/lib/openmpi3/*.so "$M"/pmix2/lib/pmix/*.so; do
  pack_libs_of "$f"
done
# Components are dlopen()ed and some link against these by soname only.
for l in "$OMPI_LIB"/libmca_common_*.so; do cp -L "$l" "$stage/pack/lib/$(basename "$l")"; done
cp "$ROOT"/tools/gpu/*.sh "$stage/pack/tools/"
git -C "$ROOT" rev-parse HEAD > "$stage/pack/COMMIT" 2>/dev/null || echo unknown > "$stage/pack/COMMIT"
# What the binaries were built from, as files and their hashes (the device gets the working
# tree but no .git): check.sh compares them there and flags a pack older than the tree.
(cd "$ROOT" && git ls-files -co --exclude-standard -- src tests bench tools inputs/models CMakeLists.txt Makefile |
   while read -r f; do [[ -f $f ]] && echo "$f"; done | LC_ALL=C sort | xargs -d '\n' sha256sum) > "$stage/pack/SOURCES.sha256"
# The newest glibc symbol version any packed file needs: check.sh compares the machine's.
for f in "$stage"/pack/bin/* "$stage"/pack/lib/*; do objdump -T "$f" 2>/dev/null | grep -oE 'GLIBC_2\.[0-9]+'; done |
  sed 's/GLIBC_//' | sort -V | tail -n 1 > "$stage/pack/GLIBC_NEEDED"
mkdir -p "$OUTDIR"
# xz -9: its 64 MiB window spans the binaries, which each carry the same kernels for every
# arch built (sm_80 and sm_90): about half the size of the default -6 (8 MiB window).
tar -C "$stage" -cf - pack | xz -9 -T2 > "$OUTDIR/pack.tar.xz.tmp"
mv "$OUTDIR/pack.tar.xz.tmp" "$OUTDIR/pack.tar.xz"
echo "pack: $(du -h "$OUTDIR/pack.tar.xz" | cut -f1) in $OUTDIR/pack.tar.xz ($(ls "$stage/pack/lib" | wc -l) libraries," \
     "$(du -sh "$stage/pack" | cut -f1) unpacked)"

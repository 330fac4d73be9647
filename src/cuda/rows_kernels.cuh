// The per-element bodies of the row-movement kernels, one functor per op, run by
// grid_stride.cuh's each_kernel (rows.cu launches them): the embedding lookup and its
// deterministic backward, scatter/gather of image rows, ViT patch extraction and embeddings.
// Memory-bound copies, one thread per output element; no atomics anywhere, so every result
// is the same on every run.
//
// Device code only; a header so that tests/test_elementwise_kernels_emulated.cpp runs these
// very functors on the CPU where no GPU is (tests/emu/cuda_emu.h).
#pragma once
#include <cstdint>

#include "cuda/device_storage.cuh"

namespace vchat::cuda {

namespace {

// out [n, D] = rows of table [V, D] for ids in [vocab_begin, vocab_begin + V), else 0 rows:
// out-of-range ids are the data path's to reject (Batch::validate); here they give 0 rows,
// which is also how another rank's vocabulary slice and image positions (-1) look.
template <class T>
struct EmbeddingFwdEach {
  const int32_t* ids;
  const T* table;
  T* out;
  int64_t V, D, vocab_begin;
  __device__ void operator()(int64_t i) const {
    const int64_t r = i / D, col = i % D, row = int64_t(ids[r]) - vocab_begin;
    if (row >= 0 && row < V)
      out[i] = table[row * D + col];  // a copy of the storage, bf16 or not
    else
      st(out, i, 0.f);
  }
};

// One thread per (group, column) of ops::TokenGroups: sums the group's rows of dout in
// position order into the table row. Groups are distinct ids, so no two threads touch one
// table element.
template <class T>
struct EmbeddingBwdEach {
  const T* dout;
  const int32_t *order, *offsets, *group_ids;
  float* dtable;
  int64_t V, D, vocab_begin;
  __device__ void operator()(int64_t i) const {
    const int64_t k = i / D, col = i % D, row = int64_t(group_ids[k]) - vocab_begin;
    if (row < 0 || row >= V) return;
    // Added one by one onto the table's value, in position order: the CPU's exact sum.
    float s = dtable[row * D + col];
    for (int32_t j = offsets[k]; j < offsets[k + 1]; ++j) s += ld(dout, int64_t(order[j]) * D + col);
    dtable[row * D + col] = s;
  }
};

// dst [rows, D]: dst[index[m]] = src[m]; indices outside [0, rows) are skipped.
template <class T>
struct ScatterRowsEach {
  const T* src;
  const int32_t* index;
  T* dst;
  int64_t rows, D;
  __device__ void operator()(int64_t i) const {
    const int64_t r = index[i / D];
    if (r >= 0 && r < rows) dst[r * D + i % D] = src[i];
  }
};

// dst [m, D]: dst[m] = src[index[m]], a 0 row for indices outside [0, rows).
template <class T>
struct GatherRowsEach {
  const T* src;
  const int32_t* index;
  T* dst;
  int64_t rows, D;
  __device__ void operator()(int64_t i) const {
    const int64_t r = index[i / D];
    if (r >= 0 && r < rows)
      dst[i] = src[r * D + i % D];
    else
      st(dst, i, 0.f);
  }
};

// pixels [N, 3, S, S] (f32) -> patches [N * g * g, 3*P*P], g = S/P, (c, kh, kw) order.
template <class T>
struct PatchifyEach {
  const float* pixels;
  T* patches;
  int64_t P, S, g;
  __device__ void operator()(int64_t i) const {
    const int64_t K = 3 * P * P, patch = i / K, k = i % K;
    const int64_t n = patch / (g * g), pr = (patch / g) % g, pc = patch % g;
    const int64_t ch = k / (P * P), kh = (k / P) % P, kw = k % P;
    st(patches, i, pixels[((n * 3 + ch) * S + pr * P + kh) * S + pc * P + kw]);
  }
};

// out [N, T, W]: row 0 is cls, row t is patch_emb's (t - 1)th of its image; plus pos [T, W].
template <class T>
struct VitEmbedFwdEach {
  const T *patch_emb, *cls, *pos;
  T* out;
  int64_t T_, W;
  __device__ void operator()(int64_t i) const {
    const int64_t n = i / (T_ * W), t = (i / W) % T_, w = i % W;
    const float src = t == 0 ? ld(cls, w) : ld(patch_emb, (n * (T_ - 1) + t - 1) * W + w);
    st(out, i, src + ld(pos, t * W + w));
  }
};

// dpatch_emb [N, T-1, W] = the rows 1.. of dout [N, T, W].
template <class T>
struct VitEmbedBwdPatchEach {
  const T* dout;
  T* dpatch_emb;
  int64_t T_, W;
  __device__ void operator()(int64_t i) const {
    const int64_t n = i / ((T_ - 1) * W), t = (i / W) % (T_ - 1) + 1, w = i % W;
    dpatch_emb[i] = dout[(n * T_ + t) * W + w];
  }
};

// d[i] += Σ_n dout[n, i] over the N images, in image order (deterministic): dpos over
// i in [0, T*W), and dcls over i in [0, W) (row 0 of every image).
template <class T>
struct VitEmbedBwdSumEach {
  const T* dout;
  float* d;
  int64_t N, T_, W;
  __device__ void operator()(int64_t i) const {
    float s = 0.f;
    for (int64_t n = 0; n < N; ++n) s += ld(dout, n * T_ * W + i);
    d[i] += s;
  }
};

}  // namespace

}  // namespace vchat::cuda

// The CUDA binding's sampled weight gradient, without its CUDA parts: the selected entries of
// grad_out.T @ input gathered from dense row chunks of the product. ops_cuda.cpp passes cuBLAS's
// product; the CPU emulation test (tests/cuda_emulation) passes a CPU one and small chunks, so the
// chunking and gathering run there too.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace fastmask {
namespace cuda {

// out[j] = P[q[j]] for the flat [n_out, n_in] product P, computed by product(r0, r1) (rows [r0, r1)
// of P as a flat fp32 tensor) in chunks of at most max(tile_entries, n_in) entries, so that P never
// exists whole unless it is that small. q: int64 flat indices; out-of-range ones (which the caller
// reports) read a clamped, valid entry.
template <class Product>
at::Tensor gather_from_row_chunks(const at::Tensor& q, int64_t n_out, int64_t n_in, int64_t tile_entries,
                                  Product&& product) {
  const int64_t numel = n_out * n_in;
  const at::Tensor qc = q.clamp(0, numel - 1);
  const int64_t rows = std::max<int64_t>(1, tile_entries / n_in);
  if (rows >= n_out) return product(0, n_out).index_select(0, qc);  // one chunk: the whole product
  at::Tensor out;
  for (int64_t r0 = 0; r0 < n_out; r0 += rows) {
    const at::Tensor tile = product(r0, std::min(n_out, r0 + rows));
    const at::Tensor local = qc - r0 * n_in;
    const at::Tensor inside = (local >= 0) & (local < tile.numel());
    const at::Tensor got = tile.index_select(0, local.clamp(0, tile.numel() - 1));
    out = r0 == 0 ? at::where(inside, got, at::zeros_like(got)) : at::where(inside, got, out);
  }
  return out;
}

}  // namespace cuda
}  // namespace fastmask

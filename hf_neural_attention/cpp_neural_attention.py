"""C++ per-pair MLP for the tiled CPU neural attention, compiled on first use.

``neural_attention_cpp`` runs the tiling, online softmax and backward of
:func:`tiled_neural_attention.neural_attention_tiled`, with the per-pair MLP of a tile (both ``mlp="paper"``
and ``mlp="authors"``) computed by a small C++ kernel built through ``torch.utils.cpp_extension.load_inline``:
the hidden units of a pair never leave registers / L1, so no ``(batch*heads, hidden, block_q, block_k)``
temporary exists. Activations (exp, tanh, erf) use branch-free polynomial approximations (fp32 relative error
~1e-7; erf absolute error <= 1.5e-7 for |x| >= 1) that the compiler vectorises; fp64 inputs use libm.

Determinism: no atomics. Forward scores are parallel over (group, query row), every score has one writer.
Backward is parallel over (group, hidden unit) for ``paper`` and over groups for ``authors``; every accumulator
has exactly one writer and a fixed summation order, so results are bitwise reproducible for any thread count.

When the extension cannot be built (no compiler, build error) or ``NEURAL_ATTENTION_NO_CPP=1`` is set,
``neural_attention_cpp`` silently runs the pure PyTorch scorers.

This file travels with Hub checkpoints: it imports only torch, the standard library and flat siblings.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from .cpp_build_neural_attention import CPP_MATH, OPENMP_FLAGS, extension_is_built, load_extension
from .kernels_neural_attention import ACTIVATION_CODES
from .tiled_neural_attention import neural_attention_tiled, tiled_ops

__all__ = ["cpp_available", "cpp_is_built", "neural_attention_cpp"]

_CPP_SOURCE = CPP_MATH + r"""// mlp="paper": score_ij = sum_m w_m act(A_im + B_jm)
// ---------------------------------------------------------------------------------------------------------------
// At (G,K,Lq), Bt (G,K,Lk), w (G,K) contiguous -> S (G, i1-i0, j1-j0).
// Chunks of JB keys keep their JB partial scores in vector registers while the hidden units stream past.
template <typename T, int ACT>
void paper_scores_impl(const T* At, const T* Bt, const T* w, T* S, int64_t G, int64_t K, int64_t Lq, int64_t Lk,
                       int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  constexpr int JB = 64;
  const int64_t bq = i1 - i0, bk = j1 - j0;
  at::parallel_for(0, G * bq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t g = r / bq, i = r % bq;
      T* s = S + (g * bq + i) * bk;
      const T* a_col = At + g * K * Lq + i0 + i;
      const T* wg = w + g * K;
      const T* bg = Bt + g * K * Lk + j0;
      int64_t j = 0;
      for (; j + JB <= bk; j += JB) {
        T acc[JB] = {};
        for (int64_t k = 0; k < K; ++k) {
          const T a = a_col[k * Lq], wk = wg[k];
          const T* b = bg + k * Lk + j;
#pragma omp simd
          for (int jj = 0; jj < JB; ++jj) acc[jj] += wk * act_f<T, ACT>(a + b[jj]);
        }
        for (int jj = 0; jj < JB; ++jj) s[j + jj] = acc[jj];
      }
      if (j < bk) {
        for (int64_t jj = j; jj < bk; ++jj) s[jj] = T(0);
        for (int64_t k = 0; k < K; ++k) {
          const T a = a_col[k * Lq], wk = wg[k];
          const T* b = bg + k * Lk;
#pragma omp simd
          for (int64_t jj = j; jj < bk; ++jj) s[jj] += wk * act_f<T, ACT>(a + b[jj]);
        }
      }
    }
  });
}

// dS (G,bq,bk); accumulates GA (G,K,Lq) += sum_j act'(pre) dS, GB (G,K,Lk) += sum_i act'(pre) dS and, except for
// relu (whose dw follows from GA and GB), dw (G,K) += sum_ij act(pre) dS. Parallel over (g, k): one writer each.
template <typename T, int ACT>
void paper_backward_impl(const T* At, const T* Bt, const T* dS, T* GA, T* GB, T* dw, int64_t G, int64_t K,
                         int64_t Lq, int64_t Lk, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  const int64_t bq = i1 - i0, bk = j1 - j0;
  at::parallel_for(0, G * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gk = begin; gk < end; ++gk) {
      const int64_t g = gk / K;
      const T* __restrict b = Bt + gk * Lk + j0;
      T* __restrict gb = GB + gk * Lk + j0;
      T* ga_out = GA + gk * Lq + i0;
      const T* a_col = At + gk * Lq + i0;
      const T* dsg = dS + g * bq * bk;
      if constexpr (ACT == RELU) {
        int64_t i = 0;
        for (; i + 4 <= bq; i += 4) {  // four query rows per sweep: one load/store of gb per four rows
          const T a0 = a_col[i], a1 = a_col[i + 1], a2 = a_col[i + 2], a3 = a_col[i + 3];
          const T* __restrict d0 = dsg + i * bk;
          const T* __restrict d1 = d0 + bk;
          const T* __restrict d2 = d1 + bk;
          const T* __restrict d3 = d2 + bk;
          T g0 = T(0), g1 = T(0), g2 = T(0), g3 = T(0);
#pragma omp simd reduction(+ : g0, g1, g2, g3)
          for (int64_t j = 0; j < bk; ++j) {
            const T nb = -b[j];
            const T m0 = a0 > nb ? d0[j] : T(0), m1 = a1 > nb ? d1[j] : T(0);
            const T m2 = a2 > nb ? d2[j] : T(0), m3 = a3 > nb ? d3[j] : T(0);
            g0 += m0; g1 += m1; g2 += m2; g3 += m3;
            gb[j] += (m0 + m1) + (m2 + m3);
          }
          ga_out[i] += g0; ga_out[i + 1] += g1; ga_out[i + 2] += g2; ga_out[i + 3] += g3;
        }
        for (; i < bq; ++i) {
          const T a = a_col[i];
          const T* __restrict ds = dsg + i * bk;
          T ga = T(0);
#pragma omp simd reduction(+ : ga)
          for (int64_t j = 0; j < bk; ++j) {
            const T m = a > -b[j] ? ds[j] : T(0);
            ga += m;
            gb[j] += m;
          }
          ga_out[i] += ga;
        }
      } else {
        T dw_acc = T(0);
        for (int64_t i = 0; i < bq; ++i) {
          const T a = a_col[i];
          const T* __restrict ds = dsg + i * bk;
          T ga = T(0), wacc = T(0);
#pragma omp simd reduction(+ : ga, wacc)
          for (int64_t j = 0; j < bk; ++j) {
            T v;
            const T d = act_df<T, ACT>(a + b[j], &v);
            const T m = d * ds[j];
            ga += m;
            gb[j] += m;
            wacc += v * ds[j];
          }
          ga_out[i] += ga;
          dw_acc += wacc;
        }
        dw[gk] += dw_acc;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// mlp="authors": score_ij = w3 . relu(W2 relu(A_i + B_j) + b2); hidden K, second layer H2
// ---------------------------------------------------------------------------------------------------------------
// A chunk of JB keys of one query row. `b` points at B[m=0][first key], rows `ldb` apart; h1 (K*JB) scratch.
template <typename T, int JB>
NA_INLINE void authors_first_layer(const T* a_col, int64_t lda, const T* b, int64_t ldb, int64_t K, T* h1) {
  for (int64_t m = 0; m < K; ++m) {
    const T a = a_col[m * lda];
    const T* bm = b + m * ldb;
    T* h = h1 + m * JB;
#pragma omp simd
    for (int jj = 0; jj < JB; ++jj) { const T x = a + bm[jj]; h[jj] = x > T(0) ? x : T(0); }
  }
}

// Second layer for units u..u+3: z_k[jj] = b2[u+k] + W2[u+k,:] . h1[:, jj]. Four (units) x JB/lanes independent
// FMA chains hide the FMA latency, one load of h1 feeds four FMAs; H2 is padded to a multiple of 4 by the caller.
template <typename T, int JB>
NA_INLINE void second_layer4(const T* W2, const T* b2, const T* h1, int64_t K, int64_t u, T* z0, T* z1, T* z2,
                             T* z3) {
  const T *w0 = W2 + u * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
#pragma omp simd
  for (int jj = 0; jj < JB; ++jj) { z0[jj] = b2[u]; z1[jj] = b2[u + 1]; z2[jj] = b2[u + 2]; z3[jj] = b2[u + 3]; }
  for (int64_t m = 0; m < K; ++m) {
    const T c0 = w0[m], c1 = w1[m], c2 = w2[m], c3 = w3[m];
    const T* h = h1 + m * JB;
#pragma omp simd
    for (int jj = 0; jj < JB; ++jj) {
      z0[jj] += c0 * h[jj]; z1[jj] += c1 * h[jj]; z2[jj] += c2 * h[jj]; z3[jj] += c3 * h[jj];
    }
  }
}

template <typename T> NA_INLINE T relu_f(T x) { return x > T(0) ? x : T(0); }

template <typename T, int JB>
NA_INLINE void authors_chunk_scores(const T* a_col, int64_t lda, const T* b, int64_t ldb, const T* W2, const T* b2,
                                    const T* w3, int64_t K, int64_t H2, T* h1, T* s) {
  authors_first_layer<T, JB>(a_col, lda, b, ldb, K, h1);
  T acc[JB] = {};
  T z0[JB], z1[JB], z2[JB], z3[JB];
  for (int64_t u = 0; u < H2; u += 4) {
    second_layer4<T, JB>(W2, b2, h1, K, u, z0, z1, z2, z3);
    const T c0 = w3[u], c1 = w3[u + 1], c2 = w3[u + 2], c3 = w3[u + 3];
#pragma omp simd
    for (int jj = 0; jj < JB; ++jj)
      acc[jj] += (c0 * relu_f(z0[jj]) + c1 * relu_f(z1[jj])) + (c2 * relu_f(z2[jj]) + c3 * relu_f(z3[jj]));
  }
  for (int jj = 0; jj < JB; ++jj) s[jj] = acc[jj];
}

// Copy the last, partial chunk of keys (n < JB of them) into a zero-padded (K, JB) buffer.
template <typename T, int JB>
void pad_keys(const T* b, int64_t ldb, int64_t K, int64_t n, T* out) {
  for (int64_t m = 0; m < K; ++m)
    for (int jj = 0; jj < JB; ++jj) out[m * JB + jj] = jj < n ? b[m * ldb + jj] : T(0);
}

// At (G,K,Lq), Bt (G,K,Lk), W2 (G,H2,K), b2 (G,H2), w3 (G,H2) -> S (G, bq, bk); parallel over (g, query row).
template <typename T>
void authors_scores_impl(const T* At, const T* Bt, const T* W2, const T* b2, const T* w3, T* S, int64_t G,
                         int64_t K, int64_t H2, int64_t Lq, int64_t Lk, int64_t i0, int64_t i1, int64_t j0,
                         int64_t j1) {
  constexpr int JB = 32;
  const int64_t bq = i1 - i0, bk = j1 - j0;
  at::parallel_for(0, G * bq, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> h1(K * JB), bpad(K * JB);
    T tail[JB];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t g = r / bq, i = r % bq;
      const T* a_col = At + g * K * Lq + i0 + i;
      const T* bg = Bt + g * K * Lk + j0;
      const T *W2g = W2 + g * H2 * K, *b2g = b2 + g * H2, *w3g = w3 + g * H2;
      T* s = S + (g * bq + i) * bk;
      int64_t j = 0;
      for (; j + JB <= bk; j += JB)
        authors_chunk_scores<T, JB>(a_col, Lq, bg + j, Lk, W2g, b2g, w3g, K, H2, h1.data(), s + j);
      if (j < bk) {
        pad_keys<T, JB>(bg + j, Lk, K, bk - j, bpad.data());
        authors_chunk_scores<T, JB>(a_col, Lq, bpad.data(), JB, W2g, b2g, w3g, K, H2, h1.data(), tail);
        for (int64_t jj = j; jj < bk; ++jj) s[jj] = tail[jj - j];
      }
    }
  });
}

// Backward of one chunk of JB keys (padded keys carry ds = 0, so they add exactly zero everywhere).
// Per group accumulators: GA column gacc (K*JB, reduced per query row), GB row gb (K, stride Lk),
// dW2 lanes (H2*K*JB), db2 / dw3 lanes (H2*JB); every lane sums its pairs in key order.
template <typename T, int JB>
NA_INLINE void authors_chunk_backward(const T* a_col, int64_t lda, const T* b, int64_t ldb, const T* ds,
                                      const T* W2, const T* b2, const T* w3, int64_t K, int64_t H2, T* h1, T* dz,
                                      T* gacc, T* gb, int64_t ldgb, T* dW2l, T* db2l, T* dw3l) {
  authors_first_layer<T, JB>(a_col, lda, b, ldb, K, h1);
  T z[4][JB];
  for (int64_t u = 0; u < H2; u += 4) {
    second_layer4<T, JB>(W2, b2, h1, K, u, z[0], z[1], z[2], z[3]);
    for (int k = 0; k < 4; ++k) {
      const T wk = w3[u + k];
      T *d3 = dw3l + (u + k) * JB, *db = db2l + (u + k) * JB, *dzk = dz + (u + k) * JB;
      const T* zk = z[k];
#pragma omp simd
      for (int jj = 0; jj < JB; ++jj) {
        const bool on = zk[jj] > T(0);
        d3[jj] += on ? ds[jj] * zk[jj] : T(0);
        dzk[jj] = on ? ds[jj] * wk : T(0);
        db[jj] += dzk[jj];
      }
    }
  }
  // dh = W2^T dz (kept in registers over u) and the dW2 lanes += dz (x) h1
  for (int64_t m = 0; m < K; ++m) {
    const T* h = h1 + m * JB;
    T dh[JB] = {};
    for (int64_t u = 0; u < H2; ++u) {
      const T wum = W2[u * K + m];
      const T* dzu = dz + u * JB;
      T* dw = dW2l + (u * K + m) * JB;
#pragma omp simd
      for (int jj = 0; jj < JB; ++jj) { dh[jj] += wum * dzu[jj]; dw[jj] += dzu[jj] * h[jj]; }
    }
    T* ga = gacc + m * JB;
    T* gbm = gb + m * ldgb;
#pragma omp simd
    for (int jj = 0; jj < JB; ++jj) {
      const T g = h[jj] > T(0) ? dh[jj] : T(0);
      ga[jj] += g;
      gbm[jj] += g;
    }
  }
}

// Lanes of a (rows, JB) accumulator summed in lane order into out (rows).
template <typename T, int JB>
void reduce_lanes(const T* lanes, int64_t rows, T* out, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    T s = T(0);
    for (int jj = 0; jj < JB; ++jj) s += lanes[r * JB + jj];
    out[r * stride] += s;
  }
}

// dS (G,bq,bk) -> GA (G,K,Lq), GB (G,K,Lk), dW2 (G,H2,K), db2 (G,H2), dw3 (G,H2), all accumulated.
// Parallel over groups only: the weight gradients of a group have one writer and a fixed order.
template <typename T>
void authors_backward_impl(const T* At, const T* Bt, const T* W2, const T* b2, const T* w3, const T* dS, T* GA,
                           T* GB, T* dW2, T* db2, T* dw3, int64_t G, int64_t K, int64_t H2, int64_t Lq, int64_t Lk,
                           int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  constexpr int JB = 32;
  const int64_t bq = i1 - i0, bk = j1 - j0;
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> h1(K * JB), bpad(K * JB), dz(H2 * JB), gacc(K * JB), dW2l(H2 * K * JB), db2l(H2 * JB),
        dw3l(H2 * JB), gbpad(K * JB);
    T dspad[JB];
    for (int64_t g = begin; g < end; ++g) {
      const T *W2g = W2 + g * H2 * K, *b2g = b2 + g * H2, *w3g = w3 + g * H2;
      const T* bg = Bt + g * K * Lk + j0;
      T* gbg = GB + g * K * Lk + j0;
      std::fill(dW2l.begin(), dW2l.end(), T(0));
      std::fill(db2l.begin(), db2l.end(), T(0));
      std::fill(dw3l.begin(), dw3l.end(), T(0));
      for (int64_t i = 0; i < bq; ++i) {
        const T* a_col = At + g * K * Lq + i0 + i;
        const T* ds = dS + (g * bq + i) * bk;
        std::fill(gacc.begin(), gacc.end(), T(0));
        int64_t j = 0;
        for (; j + JB <= bk; j += JB)
          authors_chunk_backward<T, JB>(a_col, Lq, bg + j, Lk, ds + j, W2g, b2g, w3g, K, H2, h1.data(),
                                        dz.data(), gacc.data(), gbg + j, Lk, dW2l.data(), db2l.data(), dw3l.data());
        if (j < bk) {
          const int64_t n = bk - j;
          pad_keys<T, JB>(bg + j, Lk, K, n, bpad.data());
          for (int jj = 0; jj < JB; ++jj) dspad[jj] = jj < n ? ds[j + jj] : T(0);
          std::fill(gbpad.begin(), gbpad.end(), T(0));
          authors_chunk_backward<T, JB>(a_col, Lq, bpad.data(), JB, dspad, W2g, b2g, w3g, K, H2, h1.data(),
                                        dz.data(), gacc.data(), gbpad.data(), JB, dW2l.data(), db2l.data(),
                                        dw3l.data());
          for (int64_t m = 0; m < K; ++m)
            for (int64_t jj = 0; jj < n; ++jj) gbg[m * Lk + j + jj] += gbpad[m * JB + jj];
        }
        reduce_lanes<T, JB>(gacc.data(), K, GA + g * K * Lq + i0 + i, Lq);
      }
      reduce_lanes<T, JB>(dW2l.data(), H2 * K, dW2 + g * H2 * K, 1);
      reduce_lanes<T, JB>(db2l.data(), H2, db2 + g * H2, 1);
      reduce_lanes<T, JB>(dw3l.data(), H2, dw3 + g * H2, 1);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// dispatch
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void dispatch_paper_scores(int64_t act, const T* At, const T* Bt, const T* w, T* S, int64_t G, int64_t K,
                           int64_t Lq, int64_t Lk, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  switch (act) {
    case RELU: paper_scores_impl<T, RELU>(At, Bt, w, S, G, K, Lq, Lk, i0, i1, j0, j1); break;
    case GELU: paper_scores_impl<T, GELU>(At, Bt, w, S, G, K, Lq, Lk, i0, i1, j0, j1); break;
    case SILU: paper_scores_impl<T, SILU>(At, Bt, w, S, G, K, Lq, Lk, i0, i1, j0, j1); break;
    default: paper_scores_impl<T, TANH>(At, Bt, w, S, G, K, Lq, Lk, i0, i1, j0, j1); break;
  }
}

template <typename T>
void dispatch_paper_backward(int64_t act, const T* At, const T* Bt, const T* dS, T* GA, T* GB, T* dw, int64_t G,
                             int64_t K, int64_t Lq, int64_t Lk, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  switch (act) {
    case RELU: paper_backward_impl<T, RELU>(At, Bt, dS, GA, GB, dw, G, K, Lq, Lk, i0, i1, j0, j1); break;
    case GELU: paper_backward_impl<T, GELU>(At, Bt, dS, GA, GB, dw, G, K, Lq, Lk, i0, i1, j0, j1); break;
    case SILU: paper_backward_impl<T, SILU>(At, Bt, dS, GA, GB, dw, G, K, Lq, Lk, i0, i1, j0, j1); break;
    default: paper_backward_impl<T, TANH>(At, Bt, dS, GA, GB, dw, G, K, Lq, Lk, i0, i1, j0, j1); break;
  }
}

void check_all(std::initializer_list<torch::Tensor> ts, const torch::Tensor& like) {
  for (const auto& t : ts) {
    TORCH_CHECK(t.is_contiguous(), "neural attention cpp: contiguous inputs expected");
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), "neural attention cpp: one dtype expected");
    TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble, "fp32/fp64 expected");
  }
}

void check_size(const torch::Tensor& t, const char* name, c10::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes().equals(sizes), "neural attention cpp: ", name, " has shape ", t.sizes(), ", expected ", sizes);
}

// The kernels index raw pointers: the operands must agree and the tile must lie inside the pairs.
void check_tile(const torch::Tensor& At, const torch::Tensor& Bt, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  TORCH_CHECK(At.dim() == 3 && Bt.dim() == 3 && Bt.size(0) == At.size(0) && Bt.size(1) == At.size(1),
              "neural attention cpp: At (G, hidden, q_len) and Bt (G, hidden, k_len) expected, got ", At.sizes(),
              " and ", Bt.sizes());
  TORCH_CHECK(0 <= i0 && i0 <= i1 && i1 <= At.size(2) && 0 <= j0 && j0 <= j1 && j1 <= Bt.size(2),
              "neural attention cpp: tile [", i0, ", ", i1, ") x [", j0, ", ", j1, ") outside the ", At.size(2),
              " x ", Bt.size(2), " pairs");
}

void check_authors_weights(const torch::Tensor& At, const torch::Tensor& W2, const torch::Tensor& b2,
                           const torch::Tensor& w3) {
  TORCH_CHECK(W2.dim() == 3 && W2.size(1) % 4 == 0,
              "neural attention cpp: W2 (G, hidden2, hidden) with hidden2 a multiple of 4 (zero-padded) expected");
  check_size(W2, "W2", {At.size(0), W2.size(1), At.size(1)});
  check_size(b2, "b2", {At.size(0), W2.size(1)});
  check_size(w3, "w3", {At.size(0), W2.size(1)});
}

}  // namespace

torch::Tensor paper_scores(torch::Tensor At, torch::Tensor Bt, torch::Tensor w, int64_t act, int64_t i0,
                           int64_t i1, int64_t j0, int64_t j1) {
  check_all({At, Bt, w}, At);
  check_tile(At, Bt, i0, i1, j0, j1);
  check_size(w, "w", {At.size(0), At.size(1)});
  const int64_t G = At.size(0), K = At.size(1), Lq = At.size(2), Lk = Bt.size(2);
  auto S = torch::empty({G, i1 - i0, j1 - j0}, At.options());
  AT_DISPATCH_FLOATING_TYPES(At.scalar_type(), "paper_scores", [&] {
    dispatch_paper_scores<scalar_t>(act, At.data_ptr<scalar_t>(), Bt.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                    S.data_ptr<scalar_t>(), G, K, Lq, Lk, i0, i1, j0, j1);
  });
  return S;
}

void paper_backward(torch::Tensor At, torch::Tensor Bt, torch::Tensor dS, torch::Tensor GA, torch::Tensor GB,
                    torch::Tensor dw, int64_t act, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  check_all({At, Bt, dS, GA, GB, dw}, At);
  check_tile(At, Bt, i0, i1, j0, j1);
  check_size(dS, "dS", {At.size(0), i1 - i0, j1 - j0});
  check_size(GA, "GA", At.sizes());
  check_size(GB, "GB", Bt.sizes());
  check_size(dw, "dw", {At.size(0), At.size(1)});
  const int64_t G = At.size(0), K = At.size(1), Lq = At.size(2), Lk = Bt.size(2);
  AT_DISPATCH_FLOATING_TYPES(At.scalar_type(), "paper_backward", [&] {
    dispatch_paper_backward<scalar_t>(act, At.data_ptr<scalar_t>(), Bt.data_ptr<scalar_t>(),
                                      dS.data_ptr<scalar_t>(), GA.data_ptr<scalar_t>(), GB.data_ptr<scalar_t>(),
                                      dw.data_ptr<scalar_t>(), G, K, Lq, Lk, i0, i1, j0, j1);
  });
}

torch::Tensor authors_scores(torch::Tensor At, torch::Tensor Bt, torch::Tensor W2, torch::Tensor b2,
                             torch::Tensor w3, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  check_all({At, Bt, W2, b2, w3}, At);
  check_tile(At, Bt, i0, i1, j0, j1);
  check_authors_weights(At, W2, b2, w3);
  const int64_t G = At.size(0), K = At.size(1), H2 = W2.size(1), Lq = At.size(2), Lk = Bt.size(2);
  auto S = torch::empty({G, i1 - i0, j1 - j0}, At.options());
  AT_DISPATCH_FLOATING_TYPES(At.scalar_type(), "authors_scores", [&] {
    authors_scores_impl<scalar_t>(At.data_ptr<scalar_t>(), Bt.data_ptr<scalar_t>(), W2.data_ptr<scalar_t>(),
                                  b2.data_ptr<scalar_t>(), w3.data_ptr<scalar_t>(), S.data_ptr<scalar_t>(), G, K, H2,
                                  Lq, Lk, i0, i1, j0, j1);
  });
  return S;
}

void authors_backward(torch::Tensor At, torch::Tensor Bt, torch::Tensor W2, torch::Tensor b2, torch::Tensor w3,
                      torch::Tensor dS, torch::Tensor GA, torch::Tensor GB, torch::Tensor dW2, torch::Tensor db2,
                      torch::Tensor dw3, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  check_all({At, Bt, W2, b2, w3, dS, GA, GB, dW2, db2, dw3}, At);
  check_tile(At, Bt, i0, i1, j0, j1);
  check_authors_weights(At, W2, b2, w3);
  check_size(dS, "dS", {At.size(0), i1 - i0, j1 - j0});
  check_size(GA, "GA", At.sizes());
  check_size(GB, "GB", Bt.sizes());
  check_size(dW2, "dW2", W2.sizes());
  check_size(db2, "db2", b2.sizes());
  check_size(dw3, "dw3", w3.sizes());
  const int64_t G = At.size(0), K = At.size(1), H2 = W2.size(1), Lq = At.size(2), Lk = Bt.size(2);
  AT_DISPATCH_FLOATING_TYPES(At.scalar_type(), "authors_backward", [&] {
    authors_backward_impl<scalar_t>(At.data_ptr<scalar_t>(), Bt.data_ptr<scalar_t>(), W2.data_ptr<scalar_t>(),
                                    b2.data_ptr<scalar_t>(), w3.data_ptr<scalar_t>(), dS.data_ptr<scalar_t>(),
                                    GA.data_ptr<scalar_t>(), GB.data_ptr<scalar_t>(), dW2.data_ptr<scalar_t>(),
                                    db2.data_ptr<scalar_t>(), dw3.data_ptr<scalar_t>(), G, K, H2, Lq, Lk, i0, i1, j0,
                                    j1);
  });
}

// For tests: the fp32 approximations applied elementwise (0 exp, 1 tanh, 2 erf).
torch::Tensor approx_math(torch::Tensor x, int64_t fn) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous(), "contiguous fp32 expected");
  auto y = torch::empty_like(x);
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i)
    py[i] = fn == 0 ? exp_approx(px[i]) : (fn == 1 ? tanh_approx(px[i]) : erf_approx(px[i]));
  return y;
}
"""

_CPP_DECLS = r"""
torch::Tensor paper_scores(torch::Tensor At, torch::Tensor Bt, torch::Tensor w, int64_t act, int64_t i0,
                           int64_t i1, int64_t j0, int64_t j1);
void paper_backward(torch::Tensor At, torch::Tensor Bt, torch::Tensor dS, torch::Tensor GA, torch::Tensor GB,
                    torch::Tensor dw, int64_t act, int64_t i0, int64_t i1, int64_t j0, int64_t j1);
torch::Tensor authors_scores(torch::Tensor At, torch::Tensor Bt, torch::Tensor W2, torch::Tensor b2,
                             torch::Tensor w3, int64_t i0, int64_t i1, int64_t j0, int64_t j1);
void authors_backward(torch::Tensor At, torch::Tensor Bt, torch::Tensor W2, torch::Tensor b2, torch::Tensor w3,
                      torch::Tensor dS, torch::Tensor GA, torch::Tensor GB, torch::Tensor dW2, torch::Tensor db2,
                      torch::Tensor dw3, int64_t i0, int64_t i1, int64_t j0, int64_t j1);
torch::Tensor approx_math(torch::Tensor x, int64_t fn);
"""

_FUNCTIONS = ["paper_scores", "paper_backward", "authors_scores", "authors_backward", "approx_math"]

_cpp_lock = threading.Lock()
_cpp_state: dict = {}


def _cpp_module():
    """The compiled extension, or ``None`` (no compiler, build failure, or ``NEURAL_ATTENTION_NO_CPP=1``)."""
    return load_extension("neural_attention_cpu", _CPP_SOURCE + _CPP_DECLS, _FUNCTIONS, _cpp_state, _cpp_lock,
                          OPENMP_FLAGS, OPENMP_FLAGS)


def cpp_available() -> bool:
    """Whether the C++ kernel can be used, compiling it on the first call (about a minute) unless it is cached."""
    return _cpp_module() is not None


def cpp_is_built() -> bool:
    """Whether the C++ kernel is usable without compiling: already loaded in this process, or a build of exactly
    this source and these flags is cached on disk (then the first use only loads it). Never compiles."""
    return extension_is_built("neural_attention_cpu", _CPP_SOURCE + _CPP_DECLS, _cpp_state, OPENMP_FLAGS + OPENMP_FLAGS)


# --------------------------------------------------------------------------------------------------------------
# scorers (the interface of tiled_neural_attention: scores / scores_for_backward / backward / grads)
# --------------------------------------------------------------------------------------------------------------
class _CppPaperScorer:
    """``score_ij = sum_m w_m act(A_im + B_jm)``; ``At``/``Bt`` ``(G, hidden, len)``, ``w`` ``(G, hidden)``."""

    tile_width = 4  # no hidden-sized temporaries: tiles are sized for the softmax alone

    def __init__(self, module, At: Tensor, Bt: Tensor, w: Tensor, activation: str, need_grad: bool):
        self.m, self.At, self.Bt, self.w = module, At, Bt, w.contiguous()
        self.code = ACTIVATION_CODES[activation]
        if need_grad:
            self.GA = torch.zeros_like(At)
            self.GB = torch.zeros_like(Bt)
            self.dw = torch.zeros_like(self.w)

    def scores(self, i0: int, i1: int, j0: int, j1: int) -> Tensor:
        """``(G, i1-i0, j1-j0)`` scores of one tile."""
        return self.m.paper_scores(self.At, self.Bt, self.w, self.code, i0, i1, j0, j1)

    def scores_for_backward(self, i0: int, i1: int, j0: int, j1: int) -> tuple[Tensor, None]:
        return self.scores(i0, i1, j0, j1), None

    def backward(self, cache: None, ds: Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
        """Accumulate the tile's contribution given ``ds = dL/dscore`` ``(G, i1-i0, j1-j0)``."""
        self.m.paper_backward(self.At, self.Bt, ds.contiguous(), self.GA, self.GB, self.dw, self.code, i0, i1, j0, j1)

    def grads(self) -> tuple[Tensor, Tensor, tuple[Tensor]]:
        """``(dAt, dBt, (dw,))`` with the shapes of ``At``, ``Bt``, ``w``."""
        w = self.w[:, :, None]
        dw = self.dw
        if self.code == 0:  # relu: sum_ij dS relu(a+b) = sum_i a * GA + sum_j b * GB
            dw = (self.At * self.GA).sum(-1) + (self.Bt * self.GB).sum(-1)
        return self.GA * w, self.GB * w, (dw,)


class _CppAuthorsScorer:
    """``score_ij = w3 . relu(W2 relu(A_i + B_j) + b2)``; ``W2`` ``(G, hidden2, hidden)``, ``b2``/``w3``
    ``(G, hidden2)``."""

    tile_width = 4

    def __init__(self, module, At: Tensor, Bt: Tensor, w3: Tensor, W2: Tensor, b2: Tensor, need_grad: bool):
        self.m, self.At, self.Bt = module, At, Bt
        self.hidden2 = W2.shape[1]
        pad = -self.hidden2 % 4  # the kernel runs the second layer four units at a time: zero units add nothing
        self.w3 = torch.nn.functional.pad(w3, (0, pad)).contiguous()
        self.W2 = torch.nn.functional.pad(W2, (0, 0, 0, pad)).contiguous()
        self.b2 = torch.nn.functional.pad(b2, (0, pad)).contiguous()
        if need_grad:
            self.GA = torch.zeros_like(At)
            self.GB = torch.zeros_like(Bt)
            self.dw3 = torch.zeros_like(self.w3)
            self.dW2 = torch.zeros_like(self.W2)
            self.db2 = torch.zeros_like(self.b2)

    def scores(self, i0: int, i1: int, j0: int, j1: int) -> Tensor:
        return self.m.authors_scores(self.At, self.Bt, self.W2, self.b2, self.w3, i0, i1, j0, j1)

    def scores_for_backward(self, i0: int, i1: int, j0: int, j1: int) -> tuple[Tensor, None]:
        return self.scores(i0, i1, j0, j1), None

    def backward(self, cache: None, ds: Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
        self.m.authors_backward(
            self.At, self.Bt, self.W2, self.b2, self.w3, ds.contiguous(),
            self.GA, self.GB, self.dW2, self.db2, self.dw3, i0, i1, j0, j1,
        )  # fmt: skip

    def grads(self) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        n = self.hidden2
        return self.GA, self.GB, (self.dw3[:, :n], self.dW2[:, :n], self.db2[:, :n])


def _cpp_scorer_factory(
    At: Tensor, Bt: Tensor, w: Tensor, W2: Tensor | None, b2: Tensor | None, activation: str, need_grad: bool
):
    """Scorer hook for ``neural_attention_tiled``: a C++ scorer, or ``None`` (use the PyTorch one) when the
    extension is unavailable or the compute dtype is neither fp32 nor fp64."""
    if At.dtype not in (torch.float32, torch.float64) or At.device.type != "cpu":
        return None
    module = _cpp_module()
    if module is None:
        return None
    if W2 is not None:
        return _CppAuthorsScorer(module, At, Bt, w, W2, b2, need_grad)
    return _CppPaperScorer(module, At, Bt, w, activation, need_grad)


tiled_ops(_cpp_scorer_factory)  # its custom ops, registered at import (not while torch.compile traces a call)


def neural_attention_cpp(
    query_hidden: Tensor,
    key_hidden: Tensor,
    value: Tensor,
    output_weight: Tensor,
    second_weight: Tensor | None = None,
    second_bias: Tensor | None = None,
    *,
    activation: str = "relu",
    mask: Tensor | None = None,
    causal: bool = False,
    dot_query: Tensor | None = None,
    dot_key: Tensor | None = None,
    dot_scale: float = 1.0,
    dropout_p: float = 0.0,
    generator_seed: int | Tensor | None = None,
    score_bias: Tensor | None = None,
    block_size: int | tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Same contract (``docs/design.md``; ``softcap`` and ``sinks`` as there), tiling and results as
    :func:`tiled_neural_attention.neural_attention_tiled`, with the per-pair MLP (``mlp="paper"`` with any
    activation, ``mlp="authors"``) in C++. Compiles on first use; falls back to the PyTorch scorers when the
    extension cannot be built or ``NEURAL_ATTENTION_NO_CPP=1``.

    Shapes: ``query_hidden`` ``(b, h, q_len, hidden)``, ``key_hidden`` ``(b, h, k_len, hidden)``, ``value``
    ``(b, h, k_len, v_dim)`` -> ``(b, h, q_len, v_dim)``.
    """
    return neural_attention_tiled(  # its input checks cover these arguments

        query_hidden, key_hidden, value, output_weight, second_weight, second_bias,
        activation=activation, mask=mask, causal=causal, dot_query=dot_query, dot_key=dot_key, dot_scale=dot_scale,
        dropout_p=dropout_p, generator_seed=generator_seed, score_bias=score_bias, block_size=block_size,
        scorer_factory=_cpp_scorer_factory, softcap=softcap, sinks=sinks,
    )  # fmt: skip

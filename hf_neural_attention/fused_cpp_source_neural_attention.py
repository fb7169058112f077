"""The C++ source of the fully fused CPU kernel (``fused_cpp_neural_attention.py`` compiles and calls it).

``SOURCE`` is ``FUSED_HEADERS`` + the shared math (``cpp_build_neural_attention.CPP_MATH``: includes, the anonymous
namespace, fp32 approximations of exp / tanh / erf and the activations) + ``FUSED_BODY`` (the forward, the two-pass
and single-pass backward, closing the namespace and defining the exported functions) + ``FUSED_DECLS`` (their
declarations, from which torch binds them). The layout of the work is described in ``fused_cpp_neural_attention.py``.

This file travels with Hub checkpoints: it imports only its flat sibling ``cpp_build_neural_attention``.
"""

from .cpp_build_neural_attention import CPP_MATH

FUSED_BODY = r"""
// fused forward / backward (the anonymous namespace of the math helpers is still open)

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float POS_INF = std::numeric_limits<float>::infinity();

// BLAS sgemm of the BLAS torch links (MKL exports the Fortran symbol), looked up at run time so the extension
// builds against any torch; nullptr -> the plain loops below.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
sgemm_fn find_sgemm() {
#if defined(_WIN32)
  return nullptr;
#else
  static const sgemm_fn fn = [] {
    const char* names[] = {"sgemm_", "SGEMM", "sgemm"};
    void* handle = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    for (const char* name : names) {
      void* sym = handle ? dlsym(handle, name) : nullptr;
      if (!sym) sym = dlsym(RTLD_DEFAULT, name);
      if (sym) return reinterpret_cast<sgemm_fn>(sym);
    }
    return static_cast<sgemm_fn>(nullptr);
  }();
  return fn;
#endif
}

// row-major C (M x N) = alpha op(A) op(B) + beta C (column-major BLAS on the transposes)
void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
        const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const sgemm_fn sgemm = find_sgemm();
  if (K > 0 && sgemm != nullptr) {
    const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm(&tA, &tB, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  std::vector<float> row(N);
  for (int64_t i = 0; i < M; ++i) {
    std::fill(row.begin(), row.end(), 0.0f);
    for (int64_t q = 0; q < K; ++q) {
      const float a = ta ? A[q * lda + i] : A[i * lda + q];
      if (tb) {
        for (int64_t j = 0; j < N; ++j) row[j] += a * B[j * ldb + q];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) row[j] += a * B[q * ldb + j];
      }
    }
    float* c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = alpha * row[j] + (beta == 0.0f ? 0.0f : beta * c[j]);
  }
}

// s[j] = sum_k w_k act(a_k + b[k * ldb + j]), j < n. Chunks of JB columns keep their partial scores in registers.
template <int ACT>
void mlp_row(const float* a, const float* b, int64_t ldb, const float* w, int64_t K, int64_t n, float* s) {
  constexpr int JB = 64;
  int64_t j = 0;
  for (; j + JB <= n; j += JB) {
    float acc[JB] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float ak = a[k], wk = w[k];
      const float* bk = b + k * ldb + j;
#pragma omp simd
      for (int jj = 0; jj < JB; ++jj) acc[jj] += wk * act_f<float, ACT>(ak + bk[jj]);
    }
    for (int jj = 0; jj < JB; ++jj) s[j + jj] = acc[jj];
  }
  if (j < n) {
    for (int64_t jj = j; jj < n; ++jj) s[jj] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float ak = a[k], wk = w[k];
      const float* bk = b + k * ldb;
#pragma omp simd
      for (int64_t jj = j; jj < n; ++jj) s[jj] += wk * act_f<float, ACT>(ak + bk[jj]);
    }
  }
}

// one pair's contribution: g += act'(pre) d; with NEED_W, wd += act(pre) d
template <int ACT, bool NEED_W>
NA_INLINE void pair_grad(float pre, float d, float& g, float& wd) {
  if constexpr (ACT == RELU) {
    const float m = pre > 0.0f ? d : 0.0f;
    g += m;
    if constexpr (NEED_W) wd += m * pre;
  } else {
    float v;
    const float da = act_df<float, ACT>(pre, &v);
    g += da * d;
    if constexpr (NEED_W) wd += v * d;
  }
}

// g[k] = w_k sum_j act'(a_k + b_kj) ds_j; with NEED_W also wd[k] += sum_j act(a_k + b_kj) ds_j.
// Four hidden units per sweep: one load of ds feeds four independent reduction chains (latency, not bandwidth).
template <int ACT, bool NEED_W>
void mlp_row_backward(const float* a, const float* b, int64_t ldb, const float* w, int64_t K, int64_t n,
                      const float* __restrict ds, float* g, float* wd) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const float a0 = a[k], a1 = a[k + 1], a2 = a[k + 2], a3 = a[k + 3];
    const float* __restrict b0 = b + k * ldb;
    const float* __restrict b1 = b0 + ldb;
    const float* __restrict b2 = b1 + ldb;
    const float* __restrict b3 = b2 + ldb;
    float g0 = 0.0f, g1 = 0.0f, g2 = 0.0f, g3 = 0.0f, w0 = 0.0f, w1 = 0.0f, w2 = 0.0f, w3 = 0.0f;
#pragma omp simd reduction(+ : g0, g1, g2, g3, w0, w1, w2, w3)
    for (int64_t j = 0; j < n; ++j) {
      const float d = ds[j];
      pair_grad<ACT, NEED_W>(a0 + b0[j], d, g0, w0);
      pair_grad<ACT, NEED_W>(a1 + b1[j], d, g1, w1);
      pair_grad<ACT, NEED_W>(a2 + b2[j], d, g2, w2);
      pair_grad<ACT, NEED_W>(a3 + b3[j], d, g3, w3);
    }
    g[k] = w[k] * g0; g[k + 1] = w[k + 1] * g1; g[k + 2] = w[k + 2] * g2; g[k + 3] = w[k + 3] * g3;
    if constexpr (NEED_W) { wd[k] += w0; wd[k + 1] += w1; wd[k + 2] += w2; wd[k + 3] += w3; }
  }
  for (; k < K; ++k) {
    const float ak = a[k];
    const float* __restrict bk = b + k * ldb;
    float ga = 0.0f, wa = 0.0f, gb = 0.0f, wb = 0.0f;  // two chains: even / odd j
    int64_t j = 0;
#pragma omp simd reduction(+ : ga, wa, gb, wb)
    for (j = 0; j < n / 2 * 2; j += 2) {
      pair_grad<ACT, NEED_W>(ak + bk[j], ds[j], ga, wa);
      pair_grad<ACT, NEED_W>(ak + bk[j + 1], ds[j + 1], gb, wb);
    }
    if (n % 2) pair_grad<ACT, NEED_W>(ak + bk[n - 1], ds[n - 1], ga, wa);
    g[k] = w[k] * (ga + gb);
    if constexpr (NEED_W) wd[k] += wa + wb;
  }
}

// relu in signed-max form. With w_k = sg_k |w_k| and a, b scaled by |w_k| (1 where w_k = 0):
// w_k relu(a_k + b_k) = sg_k max(a_k, -b_k) + sg_k b_k, so a score row is a per-key constant plus one max and
// one add per hidden unit (instead of add, max, multiply-add). Here s[j] = c[j] (or cr) + sum_k sg_k max(a_k, v_kj).
void relu_row(const float* a, const float* v, int64_t ldv, const float* sg, int64_t K, int64_t n, const float* c,
              float cr, float* s) {
  constexpr int JB = 64;  // a chunk's partial scores stay in registers (a compile-time length)
  int64_t j = 0;
  for (; j + JB <= n; j += JB) {
    float acc[JB];
    for (int jj = 0; jj < JB; ++jj) acc[jj] = c ? c[j + jj] : cr;
    for (int64_t k = 0; k < K; ++k) {
      const float ak = a[k];
      const float* vk = v + k * ldv + j;
      if (sg[k] > 0.0f) {
#pragma omp simd
        for (int jj = 0; jj < JB; ++jj) acc[jj] += std::max(ak, vk[jj]);
      } else if (sg[k] < 0.0f) {
#pragma omp simd
        for (int jj = 0; jj < JB; ++jj) acc[jj] -= std::max(ak, vk[jj]);
      }
    }
    for (int jj = 0; jj < JB; ++jj) s[j + jj] = acc[jj];
  }
  if (j < n) {
    for (int64_t jj = j; jj < n; ++jj) s[jj] = c ? c[jj] : cr;
    for (int64_t k = 0; k < K; ++k) {
      const float ak = a[k], sk = sg[k];
      const float* vk = v + k * ldv;
      if (sk == 0.0f) continue;
#pragma omp simd
      for (int64_t jj = j; jj < n; ++jj) s[jj] += sk * std::max(ak, vk[jj]);
    }
  }
}

// raw relu gradient (without w): g[k] = sum_j [pre_kj > 0] ds_j, where pre > 0 is a_k > v_kj (query rows: a = A,
// v = -B) or v_kj > a_k (key rows: a = -B, v = A). Four units per sweep, as in mlp_row_backward.
template <bool V_GREATER>
void relu_row_backward(const float* a, const float* v, int64_t ldv, int64_t K, int64_t n, const float* __restrict ds,
                       float* g) {
  auto on = [](float ak, float vj) { return V_GREATER ? vj > ak : ak > vj; };
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const float a0 = a[k], a1 = a[k + 1], a2 = a[k + 2], a3 = a[k + 3];
    const float* __restrict v0 = v + k * ldv;
    const float* __restrict v1 = v0 + ldv;
    const float* __restrict v2 = v1 + ldv;
    const float* __restrict v3 = v2 + ldv;
    float g0 = 0.0f, g1 = 0.0f, g2 = 0.0f, g3 = 0.0f;
#pragma omp simd reduction(+ : g0, g1, g2, g3)
    for (int64_t j = 0; j < n; ++j) {
      const float d = ds[j];
      g0 += on(a0, v0[j]) ? d : 0.0f;
      g1 += on(a1, v1[j]) ? d : 0.0f;
      g2 += on(a2, v2[j]) ? d : 0.0f;
      g3 += on(a3, v3[j]) ? d : 0.0f;
    }
    g[k] = g0; g[k + 1] = g1; g[k + 2] = g2; g[k + 3] = g3;
  }
  for (; k < K; ++k) {
    const float ak = a[k];
    const float* __restrict vk = v + k * ldv;
    float gk = 0.0f;
#pragma omp simd reduction(+ : gk)
    for (int64_t j = 0; j < n; ++j) gk += on(ak, vk[j]) ? ds[j] : 0.0f;
    g[k] = gk;
  }
}

// 64-byte aligned scratch: BLAS kernels may pick their code path by alignment, so a fixed alignment keeps the
// results bitwise reproducible from call to call
struct Scratch {
  std::vector<float> raw;
  float* ptr;
  explicit Scratch(int64_t n) : raw(n + 16) {
    const auto addr = reinterpret_cast<std::uintptr_t>(raw.data());
    ptr = raw.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
  float* data() { return ptr; }
};

struct Problem {
  // relu (signed-max form): A / At hold the scaled A, B / Bt the scaled -B, w the signs, cvec (G, Lk) = B w.
  // Row statistics: rmax (G, Lq) the row maximum (+inf: no visible key), rlog (G, Lq) the log denominator, kept
  // apart: under a -1e9 bias (a float padding mask) rmax + rlog rounds to rmax in fp32.
  const float *A, *At, *B, *Bt, *V, *w, *dq, *dk, *out, *rmax, *rlog, *dO, *D, *cvec;
  const bool* mask;  // nullptr: none
  int64_t ms0, ms1, ms2, ms3;
  const float* bias;  // score bias (batch|1, heads|1, Lq|1, Lk|1), strides 0 where it broadcasts; nullptr: none
  int64_t bs0, bs1, bs2, bs3;
  // dS, the bias's gradient, is added to dbias (rows * heads, Lq, Lk), zeroed, for the groups g0 .. g1 that one run
  // of the query-side backward covers (all of them, or `rows` batch rows, slot g - g0: each run adds to the same
  // slots, so a bias shared by the batch is summed over runs in place); nullptr: not needed
  float* dbias;
  int64_t g0, g1;
  int64_t batch, heads, G, Lq, Lk, K, Dv, Dd;
  bool causal, dot;
  float dot_scale;
  int64_t block;
  // dropout on the probabilities: pair (g, i, j) is kept iff lowbias32(qkey[g * Lq + i] ^ kkey[j]) >= threshold,
  // with per-query and per-key keys hashed from the seed: the same decision in every pass, orientation and block
  // size, and vectorisable 32-bit arithmetic per pair; kept probabilities are scaled by drop_scale = 1 / (1 - p)
  bool dropout;
  uint32_t threshold;
  float drop_scale;
  std::vector<uint32_t> qkey, kkey;
};

NA_INLINE uint32_t mix64to32(uint64_t z) {  // splitmix64 finaliser
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

NA_INLINE uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// f[c] = drop_scale where the pair (fixed, other[c]) is kept, else 0 (the pair key is symmetric in its two halves)
void keep_factors(const Problem& p, uint32_t fixed, const uint32_t* other, int64_t n, float* f) {
  const uint32_t threshold = p.threshold;
  const float scale = p.drop_scale;
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) f[c] = lowbias32(fixed ^ other[c]) >= threshold ? scale : 0.0f;
}

// visible(i, j): row-major tile rows r -> (query i0 + r) or (key j0 + r), columns c -> the other axis
NA_INLINE const bool* mask_base(const Problem& p, int64_t g) {
  return p.mask + (g / p.heads) * p.ms0 + (g % p.heads) * p.ms1;
}

NA_INLINE const float* bias_base(const Problem& p, int64_t g) {
  return p.bias + (g / p.heads) * p.bs0 + (g % p.heads) * p.bs1;
}

// s[c] += x[c * stride], c < n: a row of the score bias along keys (query-major tiles) or queries (key-major)
void add_bias_row(float* s, const float* x, int64_t stride, int64_t n) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) s[c] += x[c];
  } else if (stride == 0) {  // a bias broadcast along this axis
    const float v = x[0];
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) s[c] += v;
  } else {
    for (int64_t c = 0; c < n; ++c) s[c] += x[c * stride];
  }
}

// P from the row statistics: exp((s - max) - log denominator), 0 where s = -inf or the row sees no key
NA_INLINE float prob(float s, float mx, float lg) {
  return (s == NEG_INF || mx == POS_INF) ? 0.0f : exp_approx((s - mx) - lg);
}

// query-major tile S (bq x n) for queries i0.., keys 0..n-1: scores with mask applied (-inf)
template <int ACT>
void query_tile(const Problem& p, int64_t g, int64_t i0, int64_t bq, int64_t n, float* S) {
  const float* wg = p.w + g * p.K;
  for (int64_t r = 0; r < bq; ++r) {
    if constexpr (ACT == RELU)
      relu_row(p.A + (g * p.Lq + i0 + r) * p.K, p.Bt + g * p.K * p.Lk, p.Lk, wg, p.K, n, p.cvec + g * p.Lk, 0.0f,
               S + r * n);
    else
      mlp_row<ACT>(p.A + (g * p.Lq + i0 + r) * p.K, p.Bt + g * p.K * p.Lk, p.Lk, wg, p.K, n, S + r * n);
  }
  if (p.dot)
    mm(false, true, bq, n, p.Dd, p.dot_scale, p.dq + (g * p.Lq + i0) * p.Dd, p.Dd, p.dk + g * p.Lk * p.Dd, p.Dd,
       1.0f, S, n);
  if (p.bias) {
    const float* bb = bias_base(p, g);
    for (int64_t r = 0; r < bq; ++r) add_bias_row(S + r * n, bb + (i0 + r) * p.bs2, p.bs3, n);
  }
  if (p.mask) {
    const bool* mb = mask_base(p, g);
    for (int64_t r = 0; r < bq; ++r) {
      const bool* mr = mb + (i0 + r) * p.ms2;
      float* s = S + r * n;
      for (int64_t j = 0; j < n; ++j)
        if (!mr[j * p.ms3]) s[j] = NEG_INF;
    }
  } else if (p.causal) {
    for (int64_t r = 0; r < bq; ++r)
      for (int64_t j = i0 + r + 1; j < n; ++j) S[r * n + j] = NEG_INF;
  }
}

// key-major tile ST (bk x n) for keys j0.., queries i_lo..i_lo+n-1
template <int ACT>
void key_tile(const Problem& p, int64_t g, int64_t j0, int64_t bk, int64_t i_lo, int64_t n, float* ST) {
  const float* wg = p.w + g * p.K;
  for (int64_t r = 0; r < bk; ++r) {
    if constexpr (ACT == RELU)
      relu_row(p.B + (g * p.Lk + j0 + r) * p.K, p.At + g * p.K * p.Lq + i_lo, p.Lq, wg, p.K, n, nullptr,
               p.cvec[g * p.Lk + j0 + r], ST + r * n);
    else
      mlp_row<ACT>(p.B + (g * p.Lk + j0 + r) * p.K, p.At + g * p.K * p.Lq + i_lo, p.Lq, wg, p.K, n, ST + r * n);
  }
  if (p.dot)
    mm(false, true, bk, n, p.Dd, p.dot_scale, p.dk + (g * p.Lk + j0) * p.Dd, p.Dd, p.dq + (g * p.Lq + i_lo) * p.Dd,
       p.Dd, 1.0f, ST, n);
  if (p.bias) {
    const float* bb = bias_base(p, g);
    for (int64_t r = 0; r < bk; ++r) add_bias_row(ST + r * n, bb + (j0 + r) * p.bs3 + i_lo * p.bs2, p.bs2, n);
  }
  if (p.mask) {
    const bool* mb = mask_base(p, g);
    for (int64_t r = 0; r < bk; ++r) {
      const bool* mc = mb + (j0 + r) * p.ms3 + i_lo * p.ms2;
      float* s = ST + r * n;
      for (int64_t c = 0; c < n; ++c)
        if (!mc[c * p.ms2]) s[c] = NEG_INF;
    }
  } else if (p.causal) {
    for (int64_t r = 0; r < bk; ++r) {
      const int64_t jj = j0 + r;  // query i visible iff i >= jj
      for (int64_t c = 0; c < n && i_lo + c < jj; ++c) ST[r * n + c] = NEG_INF;
    }
  }
}

// a score row into P (see prob)
NA_INLINE void probs(float* s, int64_t n, float mx, float lg) {
  if (mx == POS_INF) {
    for (int64_t j = 0; j < n; ++j) s[j] = 0.0f;
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = prob(s[j], mx, lg);
}

NA_INLINE int64_t visible_keys(const Problem& p, int64_t i1) { return p.causal ? std::min(i1, p.Lk) : p.Lk; }

NA_INLINE void add_row(const float* src, int64_t n, float* dst) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
}

template <int ACT>
void forward_impl(const Problem& p, float* out, float* rmax, float* rlog) {
  const int64_t nqb = (p.Lq + p.block - 1) / p.block;
  at::parallel_for(0, p.G * nqb, 1, [&](int64_t begin, int64_t end) {
    Scratch S(p.block * p.Lk), F(p.dropout ? p.Lk : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / nqb, i0 = (t % nqb) * p.block, i1 = std::min(i0 + p.block, p.Lq), bq = i1 - i0;
      const int64_t n = visible_keys(p, i1);
      query_tile<ACT>(p, g, i0, bq, n, S.data());
      for (int64_t r = 0; r < bq; ++r) {
        float* s = S.data() + r * n;
        float mx = NEG_INF;
        for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
        if (mx == NEG_INF) {
          for (int64_t j = 0; j < n; ++j) s[j] = 0.0f;
          rmax[g * p.Lq + i0 + r] = POS_INF;
          rlog[g * p.Lq + i0 + r] = 0.0f;
          continue;
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) {
          const float e = s[j] == NEG_INF ? 0.0f : exp_approx(s[j] - mx);
          s[j] = e;
          sum += e;
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) s[j] *= inv;
        if (p.dropout) {
          keep_factors(p, p.qkey[g * p.Lq + i0 + r], p.kkey.data(), n, F.data());
          for (int64_t j = 0; j < n; ++j) s[j] *= F.data()[j];
        }
        rmax[g * p.Lq + i0 + r] = mx;
        rlog[g * p.Lq + i0 + r] = std::log(sum);
      }
      mm(false, false, bq, p.Dv, n, 1.0f, S.data(), n, p.V + g * p.Lk * p.Dv, p.Dv, 0.0f,
         out + (g * p.Lq + i0) * p.Dv, p.Dv);
    }
  });
}

// pass 1, for groups g0 .. g1: dA (G, Lq, K), ddq (G, Lq, Dd) (already times dot_scale), dwp (G, nqb, K) partial
// weight gradients
template <int ACT>
void backward_query_impl(const Problem& p, float* dA, float* ddq, float* dwp) {
  const int64_t nqb = (p.Lq + p.block - 1) / p.block;
  at::parallel_for(p.g0 * nqb, p.g1 * nqb, 1, [&](int64_t begin, int64_t end) {
    Scratch S(p.block * p.Lk), dP(p.block * p.Lk), F(p.dropout ? p.Lk : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / nqb, i0 = (t % nqb) * p.block, i1 = std::min(i0 + p.block, p.Lq), bq = i1 - i0;
      const int64_t n = visible_keys(p, i1);
      float* wd = dwp + t * p.K;
      for (int64_t k = 0; k < p.K; ++k) wd[k] = 0.0f;
      query_tile<ACT>(p, g, i0, bq, n, S.data());
      mm(false, true, bq, n, p.Dv, 1.0f, p.dO + (g * p.Lq + i0) * p.Dv, p.Dv, p.V + g * p.Lk * p.Dv, p.Dv, 0.0f,
         dP.data(), n);
      for (int64_t r = 0; r < bq; ++r) {
        const int64_t i = i0 + r;
        float* s = S.data() + r * n;
        float* dp = dP.data() + r * n;
        probs(s, n, p.rmax[g * p.Lq + i], p.rlog[g * p.Lq + i]);
        if (p.dropout) {  // dL/dP = keep * scale * dL/dP_dropped
          keep_factors(p, p.qkey[g * p.Lq + i], p.kkey.data(), n, F.data());
          for (int64_t j = 0; j < n; ++j) dp[j] *= F.data()[j];
        }
        const float Di = p.D[g * p.Lq + i];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) dp[j] = s[j] * (dp[j] - Di);
        if (p.dbias) add_row(dp, n, p.dbias + ((g - p.g0) * p.Lq + i) * p.Lk);  // keys past n: 0 (zeroed)
        if constexpr (ACT == RELU)  // raw: the caller applies w and forms the weight gradient
          relu_row_backward<false>(p.A + (g * p.Lq + i) * p.K, p.Bt + g * p.K * p.Lk, p.Lk, p.K, n, dp,
                                   dA + (g * p.Lq + i) * p.K);
        else
          mlp_row_backward<ACT, true>(p.A + (g * p.Lq + i) * p.K, p.Bt + g * p.K * p.Lk, p.Lk, p.w + g * p.K, p.K,
                                      n, dp, dA + (g * p.Lq + i) * p.K, wd);
      }
      if (p.dot)
        mm(false, false, bq, p.Dd, n, p.dot_scale, dP.data(), n, p.dk + g * p.Lk * p.Dd, p.Dd, 0.0f,
           ddq + (g * p.Lq + i0) * p.Dd, p.Dd);
    }
  });
}

// pass 2: dB (G, Lk, K), dV (G, Lk, Dv), ddk (G, Lk, Dd)
template <int ACT>
void backward_key_impl(const Problem& p, float* dB, float* dV, float* ddk) {
  const int64_t nkb = (p.Lk + p.block - 1) / p.block;
  at::parallel_for(0, p.G * nkb, 1, [&](int64_t begin, int64_t end) {
    Scratch S(p.block * p.Lq), dP(p.block * p.Lq), F(p.dropout ? p.Lq : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / nkb, j0 = (t % nkb) * p.block, j1 = std::min(j0 + p.block, p.Lk), bk = j1 - j0;
      const int64_t i_lo = p.causal ? std::min(j0, p.Lq) : 0, n = p.Lq - i_lo;
      if (n == 0) {
        std::fill(dB + (g * p.Lk + j0) * p.K, dB + (g * p.Lk + j1) * p.K, 0.0f);
        std::fill(dV + (g * p.Lk + j0) * p.Dv, dV + (g * p.Lk + j1) * p.Dv, 0.0f);
        if (p.dot) std::fill(ddk + (g * p.Lk + j0) * p.Dd, ddk + (g * p.Lk + j1) * p.Dd, 0.0f);
        continue;
      }
      key_tile<ACT>(p, g, j0, bk, i_lo, n, S.data());
      mm(false, true, bk, n, p.Dv, 1.0f, p.V + (g * p.Lk + j0) * p.Dv, p.Dv, p.dO + (g * p.Lq + i_lo) * p.Dv, p.Dv,
         0.0f, dP.data(), n);
      const float* rmax = p.rmax + g * p.Lq + i_lo;
      const float* rlog = p.rlog + g * p.Lq + i_lo;
      const float* D = p.D + g * p.Lq + i_lo;
      for (int64_t r = 0; r < bk; ++r) {
        float* s = S.data() + r * n;
        float* dp = dP.data() + r * n;
        if (p.dropout) {
          keep_factors(p, p.kkey[j0 + r], p.qkey.data() + g * p.Lq + i_lo, n, F.data());
          for (int64_t c = 0; c < n; ++c) dp[c] *= F.data()[c];
        }
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) {
          const float pr = prob(s[c], rmax[c], rlog[c]);
          s[c] = pr;
          dp[c] = pr * (dp[c] - D[c]);
        }
        if (p.dropout)  // dV = P_dropped^T dO
          for (int64_t c = 0; c < n; ++c) s[c] *= F.data()[c];
        if constexpr (ACT == RELU)
          relu_row_backward<true>(p.B + (g * p.Lk + j0 + r) * p.K, p.At + g * p.K * p.Lq + i_lo, p.Lq, p.K, n, dp,
                                  dB + (g * p.Lk + j0 + r) * p.K);
        else
          mlp_row_backward<ACT, false>(p.B + (g * p.Lk + j0 + r) * p.K, p.At + g * p.K * p.Lq + i_lo, p.Lq,
                                       p.w + g * p.K, p.K, n, dp, dB + (g * p.Lk + j0 + r) * p.K, nullptr);
      }
      mm(false, false, bk, p.Dv, n, 1.0f, S.data(), n, p.dO + (g * p.Lq + i_lo) * p.Dv, p.Dv, 0.0f,
         dV + (g * p.Lk + j0) * p.Dv, p.Dv);
      if (p.dot)
        mm(false, false, bk, p.Dd, n, p.dot_scale, dP.data(), n, p.dq + (g * p.Lq + i_lo) * p.Dd, p.Dd, 0.0f,
           ddk + (g * p.Lk + j0) * p.Dd, p.Dd);
    }
  });
}

// relu backward in one pass per (batch, head) group: every visible (query block, key block) tile is recomputed once
// and feeds dA, dB (raw, see relu_row), dV and the dot-term gradients, so the scores, exp and dO V^T are computed
// once instead of once per pass. Groups run in parallel: no two threads touch the same rows (no atomics), and
// each group sums its tiles in a fixed order (deterministic). Groups g0 .. g1.
void backward_relu_single_pass(const Problem& p, float* dA, float* dB, float* dV, float* ddq, float* ddk) {
  const int64_t bs = p.block, K = p.K;
  at::parallel_for(p.g0, p.g1, 1, [&](int64_t begin, int64_t end) {
    Scratch S(bs * bs), dP(bs * bs), col(K * bs), F(bs);
    for (int64_t g = begin; g < end; ++g) {
      std::fill(dA + g * p.Lq * K, dA + (g + 1) * p.Lq * K, 0.0f);
      std::fill(dV + g * p.Lk * p.Dv, dV + (g + 1) * p.Lk * p.Dv, 0.0f);
      if (p.dot) {
        std::fill(ddq + g * p.Lq * p.Dd, ddq + (g + 1) * p.Lq * p.Dd, 0.0f);
        std::fill(ddk + g * p.Lk * p.Dd, ddk + (g + 1) * p.Lk * p.Dd, 0.0f);
      }
      const float* Bt = p.Bt + g * K * p.Lk;  // (K, Lk): the scaled -B
      const bool* mb = p.mask ? mask_base(p, g) : nullptr;
      const float* bb = p.bias ? bias_base(p, g) : nullptr;
      for (int64_t j0 = 0; j0 < p.Lk; j0 += bs) {
        const int64_t j1 = std::min(j0 + bs, p.Lk), bk = j1 - j0;
        float* cs = col.data();
        std::fill(cs, cs + K * bk, 0.0f);
        for (int64_t i0 = p.causal ? j0 : 0; i0 < p.Lq; i0 += bs) {  // causal: queries >= j0 only
          const int64_t i1 = std::min(i0 + bs, p.Lq), bq = i1 - i0;
          float* st = S.data();
          for (int64_t r = 0; r < bq; ++r)
            relu_row(p.A + (g * p.Lq + i0 + r) * K, Bt + j0, p.Lk, p.w + g * K, K, bk, p.cvec + g * p.Lk + j0,
                     0.0f, st + r * bk);
          if (p.dot)
            mm(false, true, bq, bk, p.Dd, p.dot_scale, p.dq + (g * p.Lq + i0) * p.Dd, p.Dd,
               p.dk + (g * p.Lk + j0) * p.Dd, p.Dd, 1.0f, st, bk);
          if (bb)
            for (int64_t r = 0; r < bq; ++r) add_bias_row(st + r * bk, bb + (i0 + r) * p.bs2 + j0 * p.bs3, p.bs3, bk);
          if (mb) {
            for (int64_t r = 0; r < bq; ++r)
              for (int64_t c = 0; c < bk; ++c)
                if (!mb[(i0 + r) * p.ms2 + (j0 + c) * p.ms3]) st[r * bk + c] = NEG_INF;
          } else if (p.causal) {
            for (int64_t r = 0; r < bq; ++r)
              for (int64_t c = std::max<int64_t>(i0 + r + 1 - j0, 0); c < bk; ++c) st[r * bk + c] = NEG_INF;
          }
          float* dp = dP.data();
          mm(false, true, bq, bk, p.Dv, 1.0f, p.dO + (g * p.Lq + i0) * p.Dv, p.Dv, p.V + (g * p.Lk + j0) * p.Dv,
             p.Dv, 0.0f, dp, bk);
          for (int64_t r = 0; r < bq; ++r) {
            const float mx = p.rmax[g * p.Lq + i0 + r], lg = p.rlog[g * p.Lq + i0 + r], Di = p.D[g * p.Lq + i0 + r];
            float* sr = st + r * bk;
            float* dr = dp + r * bk;
            if (p.dropout) {
              keep_factors(p, p.qkey[g * p.Lq + i0 + r], p.kkey.data() + j0, bk, F.data());
              for (int64_t c = 0; c < bk; ++c) dr[c] *= F.data()[c];
            }
#pragma omp simd
            for (int64_t c = 0; c < bk; ++c) {
              const float pr = prob(sr[c], mx, lg);
              sr[c] = pr;
              dr[c] = pr * (dr[c] - Di);
            }
            if (p.dbias) add_row(dr, bk, p.dbias + ((g - p.g0) * p.Lq + i0 + r) * p.Lk + j0);
            if (p.dropout)  // dV = P_dropped^T dO
              for (int64_t c = 0; c < bk; ++c) sr[c] *= F.data()[c];
          }
          mm(true, false, bk, p.Dv, bq, 1.0f, st, bk, p.dO + (g * p.Lq + i0) * p.Dv, p.Dv, 1.0f,
             dV + (g * p.Lk + j0) * p.Dv, p.Dv);
          if (p.dot) {
            mm(false, false, bq, p.Dd, bk, p.dot_scale, dp, bk, p.dk + (g * p.Lk + j0) * p.Dd, p.Dd, 1.0f,
               ddq + (g * p.Lq + i0) * p.Dd, p.Dd);
            mm(true, false, bk, p.Dd, bq, p.dot_scale, dp, bk, p.dq + (g * p.Lq + i0) * p.Dd, p.Dd, 1.0f,
               ddk + (g * p.Lk + j0) * p.Dd, p.Dd);
          }
          // one compare per (pair, unit) feeds both the row sum (dA) and the column sums (dB)
          for (int64_t r = 0; r < bq; ++r) {
            const float* a = p.A + (g * p.Lq + i0 + r) * K;
            const float* __restrict ds = dp + r * bk;
            float* da = dA + (g * p.Lq + i0 + r) * K;
            for (int64_t k = 0; k < K; ++k) {
              const float ak = a[k];
              const float* __restrict v = Bt + k * p.Lk + j0;
              float* __restrict ck = cs + k * bk;
              float gk = 0.0f;
#pragma omp simd reduction(+ : gk)
              for (int64_t c = 0; c < bk; ++c) {
                const float m = ak > v[c] ? ds[c] : 0.0f;
                gk += m;
                ck[c] += m;
              }
              da[k] += gk;
            }
          }
        }
        for (int64_t c = 0; c < bk; ++c)
          for (int64_t k = 0; k < K; ++k) dB[(g * p.Lk + j0 + c) * K + k] = cs[k * bk + c];
      }
    }
  });
}

#define NA_DISPATCH_ACT(act, FN, ...)                    \
  switch (act) {                                         \
    case RELU: FN<RELU>(__VA_ARGS__); break;             \
    case GELU: FN<GELU>(__VA_ARGS__); break;             \
    case SILU: FN<SILU>(__VA_ARGS__); break;             \
    default: FN<TANH>(__VA_ARGS__); break;               \
  }

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.device().is_cpu(),
              "fused neural attention: ", name, " must be a contiguous fp32 CPU tensor");
}

void check_size(const torch::Tensor& t, const char* name, c10::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes().equals(sizes), "fused neural attention: ", name, " has shape ", t.sizes(), ", expected ",
              sizes);
}

Problem make_problem(const torch::Tensor& A, const torch::Tensor& At, const torch::Tensor& B,
                     const torch::Tensor& Bt, const torch::Tensor& V, const torch::Tensor& w,
                     const std::optional<torch::Tensor>& dq, const std::optional<torch::Tensor>& dk,
                     const std::optional<torch::Tensor>& mask, const torch::Tensor& cvec, int64_t batch,
                     int64_t heads, bool causal, double dot_scale, int64_t act, int64_t block, double dropout_p) {
  check_f32(A, "A"); check_f32(At, "At"); check_f32(B, "B"); check_f32(Bt, "Bt"); check_f32(V, "V");
  check_f32(w, "w");
  TORCH_CHECK(A.dim() == 3 && At.dim() == 3 && B.dim() == 3 && Bt.dim() == 3 && V.dim() == 3,
              "fused neural attention: A, At, B, Bt and V must be 3-D (batch * heads, len, dim)");
  Problem p{};
  p.A = A.data_ptr<float>(); p.At = At.data_ptr<float>(); p.B = B.data_ptr<float>(); p.Bt = Bt.data_ptr<float>();
  p.V = V.data_ptr<float>(); p.w = w.data_ptr<float>();
  p.cvec = nullptr;
  if (act == RELU) {
    check_f32(cvec, "cvec");
    p.cvec = cvec.data_ptr<float>();
  }
  p.G = A.size(0); p.Lq = A.size(1); p.K = A.size(2); p.Lk = B.size(1); p.Dv = V.size(2);
  p.batch = batch; p.heads = heads;
  TORCH_CHECK(p.G == batch * heads, "fused neural attention: G != batch * heads");
  p.dot = dq.has_value();
  TORCH_CHECK(dq.has_value() == dk.has_value(), "fused neural attention: dot_query and dot_key go together");
  TORCH_CHECK(block >= 1, "fused neural attention: block must be >= 1");
  if (p.dot) {
    check_f32(*dq, "dot_query"); check_f32(*dk, "dot_key");
    p.dq = dq->data_ptr<float>(); p.dk = dk->data_ptr<float>(); p.Dd = dq->size(2);
  }
  p.mask = nullptr;
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.scalar_type() == torch::kBool && m.dim() == 4 && m.device().is_cpu(),
                "fused neural attention: a 4-D bool CPU mask expected");
    p.mask = m.data_ptr<bool>();
    p.ms0 = m.stride(0); p.ms1 = m.stride(1); p.ms2 = m.stride(2); p.ms3 = m.stride(3);
  }
  p.bias = nullptr;
  p.dbias = nullptr;
  p.g0 = 0;
  p.g1 = p.G;
  p.causal = causal && !mask.has_value();
  p.dot_scale = static_cast<float>(dot_scale);
  p.block = block;
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fused neural attention: dropout_p must be in [0, 1)");
  p.dropout = dropout_p > 0.0;
  p.threshold = static_cast<uint32_t>(std::min(dropout_p * 4294967296.0, 4294967295.0));
  p.drop_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  return p;
}

// The kernels index raw pointers: every size they read must agree (called once the lengths are final).
void check_shapes(const Problem& p, const torch::Tensor& Bt, const torch::Tensor& V, const torch::Tensor& w,
                  const std::optional<torch::Tensor>& dq, const std::optional<torch::Tensor>& dk,
                  const std::optional<torch::Tensor>& mask, const torch::Tensor& cvec, int64_t act) {
  check_size(Bt, "Bt", {p.G, p.K, p.Lk});
  check_size(V, "V", {p.G, p.Lk, p.Dv});
  check_size(w, "w", {p.G, p.K});
  if (p.dot) {
    check_size(*dq, "dot_query", {p.G, p.Lq, p.Dd});
    check_size(*dk, "dot_key", {p.G, p.Lk, p.Dd});
  }
  if (mask.has_value()) check_size(*mask, "mask", {p.batch, p.heads, p.Lq, p.Lk});  // expanded; strides may be 0
  if (act == RELU) check_size(cvec, "cvec", {p.G, p.Lk});
}

// the score bias (batch|1, heads|1, Lq|1, Lk|1) fp32, read with stride 0 along the dims it broadcasts (after the
// lengths are final)
void set_bias(Problem& p, const std::optional<torch::Tensor>& bias) {
  if (!bias.has_value()) return;
  const auto& x = *bias;
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 4 && x.device().is_cpu(),
              "fused neural attention: score_bias must be a 4-D fp32 CPU tensor");
  const int64_t full[4] = {p.batch, p.heads, p.Lq, p.Lk};
  int64_t strides[4];
  for (int d = 0; d < 4; ++d) {
    TORCH_CHECK(x.size(d) == full[d] || x.size(d) == 1, "fused neural attention: score_bias has shape ", x.sizes(),
                ", which does not broadcast to (batch, heads, q_len, k_len) = (", p.batch, ", ", p.heads, ", ", p.Lq,
                ", ", p.Lk, ")");
    strides[d] = x.size(d) == 1 ? 0 : x.stride(d);
  }
  p.bias = x.data_ptr<float>();
  p.bs0 = strides[0]; p.bs1 = strides[1]; p.bs2 = strides[2]; p.bs3 = strides[3];
}

// the per-query and per-key dropout keys (after the lengths are final)
void set_dropout_keys(Problem& p, int64_t seed) {
  if (!p.dropout) return;
  const auto s = static_cast<uint64_t>(seed);
  p.qkey.resize(p.G * p.Lq);
  p.kkey.resize(p.Lk);
  for (int64_t t = 0; t < p.G * p.Lq; ++t)
    p.qkey[t] = mix64to32(s ^ (static_cast<uint64_t>(t) * 0xD1B54A32D192ED03ull));
  for (int64_t j = 0; j < p.Lk; ++j) p.kkey[j] = mix64to32(~s ^ (static_cast<uint64_t>(j) * 0xA0761D6478BD642Full));
}

}  // namespace

std::vector<torch::Tensor> fused_forward(torch::Tensor A, torch::Tensor Bt, torch::Tensor V, torch::Tensor w,
                                         std::optional<torch::Tensor> dq, std::optional<torch::Tensor> dk,
                                         std::optional<torch::Tensor> mask, std::optional<torch::Tensor> bias,
                                         torch::Tensor cvec, int64_t batch, int64_t heads, bool causal,
                                         double dot_scale, int64_t act, int64_t block, double dropout_p,
                                         int64_t seed) {
  // forward needs neither At nor B: pass A / Bt in their place (unused)
  Problem p = make_problem(A, A, Bt, Bt, V, w, dq, dk, mask, cvec, batch, heads, causal, dot_scale, act, block,
                           dropout_p);
  p.Lk = Bt.size(2);
  check_shapes(p, Bt, V, w, dq, dk, mask, cvec, act);
  set_bias(p, bias);
  set_dropout_keys(p, seed);
  auto out = torch::empty({p.G, p.Lq, p.Dv}, V.options());
  auto stats = torch::empty({2, p.G, p.Lq}, V.options());  // row max, log denominator
  float* st = stats.data_ptr<float>();
  NA_DISPATCH_ACT(act, forward_impl, p, out.data_ptr<float>(), st, st + p.G * p.Lq);
  return {out, stats};
}

std::vector<torch::Tensor> fused_backward(torch::Tensor A, torch::Tensor At, torch::Tensor B, torch::Tensor Bt,
                                          torch::Tensor V, torch::Tensor w, std::optional<torch::Tensor> dq,
                                          std::optional<torch::Tensor> dk, std::optional<torch::Tensor> mask,
                                          std::optional<torch::Tensor> bias, bool bias_grad, int64_t bias_rows,
                                          torch::Tensor cvec,
                                          torch::Tensor stats, torch::Tensor dO, torch::Tensor D, int64_t batch,
                                          int64_t heads, bool causal, double dot_scale, int64_t act, int64_t block,
                                          bool single_pass, double dropout_p, int64_t seed) {
  Problem p = make_problem(A, At, B, Bt, V, w, dq, dk, mask, cvec, batch, heads, causal, dot_scale, act, block,
                           dropout_p);
  check_shapes(p, Bt, V, w, dq, dk, mask, cvec, act);
  check_size(At, "At", {p.G, p.K, p.Lq});
  check_size(B, "B", {p.G, p.Lk, p.K});
  check_f32(stats, "stats"); check_f32(dO, "dO"); check_f32(D, "D");
  check_size(stats, "stats", {2, p.G, p.Lq});
  check_size(dO, "dO", {p.G, p.Lq, p.Dv});
  check_size(D, "D", {p.G, p.Lq});
  set_bias(p, bias);
  set_dropout_keys(p, seed);
  p.rmax = stats.data_ptr<float>(); p.rlog = p.rmax + p.G * p.Lq;
  p.dO = dO.data_ptr<float>(); p.D = D.data_ptr<float>();
  const bool with_dbias = bias_grad && p.bias;
  TORCH_CHECK(!with_dbias || (bias_rows >= 1 && (bias_rows >= batch || bias.value().size(0) == 1)),
              "fused neural attention: bias_rows must be >= 1, and below batch only for a bias shared by the batch");
  const int64_t rows = with_dbias ? std::min(bias_rows, batch) : batch;
  const int64_t nqb = (p.Lq + block - 1) / block;
  auto dA = torch::empty({p.G, p.Lq, p.K}, V.options());
  auto dB = torch::empty({p.G, p.Lk, p.K}, V.options());
  auto dV = torch::empty({p.G, p.Lk, p.Dv}, V.options());
  auto dwp = torch::zeros({p.G, nqb, p.K}, V.options());
  torch::Tensor ddq, ddk;
  if (p.dot) {
    ddq = torch::empty({p.G, p.Lq, p.Dd}, V.options());
    ddk = torch::empty({p.G, p.Lk, p.Dd}, V.options());
  } else {
    ddq = torch::empty({0}, V.options());
    ddk = torch::empty({0}, V.options());
  }
  float* ddq_p = p.dot ? ddq.data_ptr<float>() : nullptr;
  float* ddk_p = p.dot ? ddk.data_ptr<float>() : nullptr;
  // dS, the bias's gradient, for `rows` batch rows per run of the query side, added in place (zeros: the kernels
  // touch only the pairs a query sees), returned (rows * heads, Lq, Lk) for the caller to sum where the bias
  // broadcasts: all rows in one run, or for a bias shared by the batch, each run's rows added to the last's
  torch::Tensor dbias = torch::zeros({with_dbias ? rows * heads : 0, p.Lq, p.Lk}, V.options());
  if (with_dbias) p.dbias = dbias.data_ptr<float>();
  for (int64_t b0 = 0; b0 < batch; b0 += rows) {
    const int64_t n_rows = std::min(rows, batch - b0);
    p.g0 = b0 * heads;
    p.g1 = (b0 + n_rows) * heads;
    if (act == RELU && single_pass)
      backward_relu_single_pass(p, dA.data_ptr<float>(), dB.data_ptr<float>(), dV.data_ptr<float>(), ddq_p, ddk_p);
    else
      NA_DISPATCH_ACT(act, backward_query_impl, p, dA.data_ptr<float>(), ddq_p, dwp.data_ptr<float>());
  }
  if (!(act == RELU && single_pass)) {
    p.g0 = 0;
    p.g1 = p.G;
    NA_DISPATCH_ACT(act, backward_key_impl, p, dB.data_ptr<float>(), dV.data_ptr<float>(), ddk_p);
  }
  // weight gradient: partials summed in a fixed order
  auto dw = torch::zeros({p.G, p.K}, V.options());
  const float* part = dwp.data_ptr<float>();
  float* dwo = dw.data_ptr<float>();
  for (int64_t g = 0; g < p.G; ++g)
    for (int64_t b = 0; b < nqb; ++b)
      for (int64_t k = 0; k < p.K; ++k) dwo[g * p.K + k] += part[(g * nqb + b) * p.K + k];
  return {dA, dB, dV, dw, ddq, ddk, dbias};
}
"""

FUSED_DECLS = r"""
std::vector<torch::Tensor> fused_forward(torch::Tensor A, torch::Tensor Bt, torch::Tensor V, torch::Tensor w,
                                         std::optional<torch::Tensor> dq, std::optional<torch::Tensor> dk,
                                         std::optional<torch::Tensor> mask, std::optional<torch::Tensor> bias,
                                         torch::Tensor cvec, int64_t batch, int64_t heads, bool causal,
                                         double dot_scale, int64_t act, int64_t block, double dropout_p,
                                         int64_t seed);
std::vector<torch::Tensor> fused_backward(torch::Tensor A, torch::Tensor At, torch::Tensor B, torch::Tensor Bt,
                                          torch::Tensor V, torch::Tensor w, std::optional<torch::Tensor> dq,
                                          std::optional<torch::Tensor> dk, std::optional<torch::Tensor> mask,
                                          std::optional<torch::Tensor> bias, bool bias_grad, int64_t bias_rows,
                                          torch::Tensor cvec,
                                          torch::Tensor stats, torch::Tensor dO, torch::Tensor D, int64_t batch,
                                          int64_t heads, bool causal, double dot_scale, int64_t act, int64_t block,
                                          bool single_pass, double dropout_p, int64_t seed);
"""

FUSED_HEADERS = "#include <limits>\n#include <optional>\n#if !defined(_WIN32)\n#include <dlfcn.h>\n#endif\n"

SOURCE = FUSED_HEADERS + CPP_MATH + FUSED_BODY + FUSED_DECLS

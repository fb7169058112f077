"""Building the C++ CPU kernels: compile on first use, cache per source, flags and CPU, fall back when impossible.

``load_extension`` compiles a C++ source with ``torch.utils.cpp_extension.load_inline`` once per process (the build
cached under ``TORCH_EXTENSIONS_DIR``, named by a hash of the source, the flags and, for ``-march=native``, the CPU),
and returns ``None`` where it cannot (no compiler, a build error, ``NEURAL_ATTENTION_NO_CPP=1``): the callers then
run the PyTorch kernel. ``CPP_MATH`` is the C++ both kernels start with: includes, the anonymous namespace they
close, and fp32 branch-free approximations of exp / tanh / erf and the activations with their derivatives
(vectorised by ``omp simd``, unlike libm calls; fp64 keeps libm).

Environment: ``NEURAL_ATTENTION_NO_CPP=1`` skips the build, ``NEURAL_ATTENTION_CPP_NATIVE=0`` compiles without
``-march=native`` (one build for different CPUs).

This file travels with Hub checkpoints: it imports only torch and the standard library.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
import threading

import torch

__all__ = ["CPP_MATH", "OPENMP_FLAGS", "extension_is_built", "load_extension"]

CPP_MATH = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__GNUC__) || defined(__clang__)
#define NA_INLINE inline __attribute__((always_inline))
#else
#define NA_INLINE inline
#endif

namespace {

enum Act { RELU = 0, GELU = 1, SILU = 2, TANH = 3 };

// ---------------------------------------------------------------------------------------------------------------
// math: fp32 branch-free approximations (vectorised by `omp simd`, unlike libm calls); fp64 keeps libm
// ---------------------------------------------------------------------------------------------------------------
NA_INLINE float bits_to_float(int32_t i) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(float, i);
#else
  float f; std::memcpy(&f, &i, sizeof(f)); return f;
#endif
}

// Cephes expf: Cody-Waite reduction by ln2, degree-6 polynomial; relative error ~1e-7 on [-87, 88].
NA_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // round(x / ln2) by the 1.5 * 2^23 shifter: std::floor is a libm call the vectoriser refuses (trapping math)
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const int32_t ni = static_cast<int32_t>(n);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  return p * bits_to_float((ni + 127) << 23);
}

// |x| < 0.55: odd Taylor polynomial to x^15 (no cancellation); else 1 - 2 / (exp(2|x|) + 1).
NA_INLINE float tanh_approx(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float z = x * x;
  float p = -929569.0f / 638512875.0f;
  p = p * z + 21844.0f / 6081075.0f;
  p = p * z - 1382.0f / 155925.0f;
  p = p * z + 62.0f / 2835.0f;
  p = p * z - 17.0f / 315.0f;
  p = p * z + 2.0f / 15.0f;
  p = p * z - 1.0f / 3.0f;
  const float small = x + x * z * p;
  const float big = 1.0f - 2.0f / (exp_approx(2.0f * ax) + 1.0f);
  return ax < 0.55f ? small : (x < 0.0f ? -big : big);
}

// |x| < 1: Taylor series to x^21 (relative error ~1e-8); else Abramowitz-Stegun 7.1.26 (absolute error <= 1.5e-7,
// the formula ATen's own vectorised erf uses).
NA_INLINE float erf_approx(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float z = x * x;
  float p = -1.0f / (3628800.0f * 21.0f);
  p = p * z + 1.0f / (362880.0f * 19.0f);
  p = p * z - 1.0f / (40320.0f * 17.0f);
  p = p * z + 1.0f / (5040.0f * 15.0f);
  p = p * z - 1.0f / (720.0f * 13.0f);
  p = p * z + 1.0f / (120.0f * 11.0f);
  p = p * z - 1.0f / (24.0f * 9.0f);
  p = p * z + 1.0f / (6.0f * 7.0f);
  p = p * z - 1.0f / (2.0f * 5.0f);
  p = p * z + 1.0f / 3.0f;
  const float small = 1.1283791670955126f * (x - x * z * p);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  const float big = 1.0f - q * t * exp_approx(-z);
  return ax < 1.0f ? small : (x < 0.0f ? -big : big);
}

template <typename T> struct Math;
template <> struct Math<float> {
  static NA_INLINE float exp(float x) { return exp_approx(x); }
  static NA_INLINE float tanh(float x) { return tanh_approx(x); }
  static NA_INLINE float erf(float x) { return erf_approx(x); }
};
template <> struct Math<double> {
  static NA_INLINE double exp(double x) { return std::exp(x); }
  static NA_INLINE double tanh(double x) { return std::tanh(x); }
  static NA_INLINE double erf(double x) { return std::erf(x); }
};

template <typename T, int ACT>
NA_INLINE T act_f(T x) {
  if constexpr (ACT == RELU) return x > T(0) ? x : T(0);
  if constexpr (ACT == GELU) return T(0.5) * x * (T(1) + Math<T>::erf(x * T(0.70710678118654752440)));
  if constexpr (ACT == SILU) return x / (T(1) + Math<T>::exp(-x));
  return Math<T>::tanh(x);
}

// derivative, and the value through *val
template <typename T, int ACT>
NA_INLINE T act_df(T x, T* val) {
  if constexpr (ACT == RELU) { *val = x > T(0) ? x : T(0); return x > T(0) ? T(1) : T(0); }
  if constexpr (ACT == GELU) {
    const T cdf = T(0.5) * (T(1) + Math<T>::erf(x * T(0.70710678118654752440)));
    const T pdf = Math<T>::exp(T(-0.5) * x * x) * T(0.39894228040143267794);
    *val = x * cdf;
    return cdf + x * pdf;
  }
  if constexpr (ACT == SILU) {
    const T s = T(1) / (T(1) + Math<T>::exp(-x));
    *val = x * s;
    return s * (T(1) + x * (T(1) - s));
  }
  const T t = Math<T>::tanh(x);
  *val = t;
  return T(1) - t * t;
}

// ---------------------------------------------------------------------------------------------------------------
"""

# at::parallel_for only runs in parallel in code compiled with OpenMP (ATen's OpenMP backend inlines `omp parallel`);
# the extension then links the libgomp torch already loaded (same soname).
OPENMP_FLAGS = ("-fopenmp",)


# --------------------------------------------------------------------------------------------------------------
# build / load
# --------------------------------------------------------------------------------------------------------------
def _build_flags() -> list[str]:
    flags = ["-O3", "-fopenmp-simd", "-ffp-contract=fast", "-mprefer-vector-width=512"]
    if os.environ.get("NEURAL_ATTENTION_CPP_NATIVE", "1") == "1":
        flags.append("-march=native")
    return flags


@functools.cache
def _host_cpu() -> str:
    """What ``-march=native`` compiles for here: the compiler driver's expansion of it (gcc: ``-march=<cpu>`` and
    its ``-m`` feature flags; clang: ``-target-cpu`` / ``-target-feature``), which is exact and ignores the flags a
    kernel update adds (mitigations); without a compiler that answers, the CPU's model and feature flags (Linux:
    the first processor in /proc/cpuinfo), else the platform's description of it."""
    try:
        driver = subprocess.run([os.environ.get("CXX", "c++"), "-march=native", "-###", "-x", "c++", "-c", os.devnull,
                                 "-o", os.devnull], capture_output=True, text=True, timeout=60)  # fmt: skip
        tokens = driver.stderr.replace('"', " ").replace("'", " ").split()
    except (OSError, subprocess.SubprocessError):
        tokens = []
    target = sorted({token for previous, token in zip(["", *tokens], tokens, strict=False)
                     if (token.startswith(("-m", "--param")) and token != "-march=native")
                     or previous in ("-target-cpu", "-target-feature", "--param")})  # fmt: skip
    if any(token.startswith("-march=") for token in target) or "-target-cpu" in tokens:
        return " ".join(target)
    keys = {"vendor_id", "model name", "flags", "CPU implementer", "CPU part", "Features"}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            first = f.read(1 << 20).split("\n\n")[0]
    except OSError:
        first = ""
    described = [line for line in first.splitlines() if line.split(":")[0].strip() in keys]
    return "\n".join(described) or f"{platform.machine()} {platform.processor()}"


def _extension_name(prefix: str, source: str, extra_flags: tuple[str, ...] = ()) -> str:
    """Name of the extension: hashes the source and flags, so a cached build is only reused when it matches (and
    :func:`extension_is_built` can tell without compiling). A ``-march=native``
    build also hashes the CPU: a build cache shared between machines (a home directory on a cluster) must not hand
    one CPU's build to another, where an instruction it lacks would kill the process."""
    flags = _build_flags() + list(extra_flags)
    host = _host_cpu() if "-march=native" in flags else ""
    digest = hashlib.sha256((source + " ".join(flags) + host).encode()).hexdigest()[:12]
    return f"{prefix}_{digest}"


def _disabled() -> bool:
    return os.environ.get("NEURAL_ATTENTION_NO_CPP", "0") == "1"


def _build_directory(name: str) -> str:
    """Where ``load_inline`` builds ``name`` (mirrors ``torch.utils.cpp_extension._get_build_directory``, which
    creates the directory as a side effect)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        cuda = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
        root = os.path.join(get_default_build_root(), f"{python}_{cuda}")
    return os.path.join(root, name)


def load_extension(
    prefix: str,
    source: str,
    functions: list[str],
    state: dict,
    lock: threading.Lock,
    extra_cflags: tuple[str, ...] = (),
    extra_ldflags: tuple[str, ...] = (),
):
    """Compile (or load the cached build of) ``source`` as the extension ``prefix_<hash>`` exposing ``functions``,
    once per process: the module is cached in ``state["module"]``; ``None`` when the build fails (the error in
    ``state["error"]``) or ``NEURAL_ATTENTION_NO_CPP=1``. ``extra_cflags`` / ``extra_ldflags`` are added to the
    flags of this file (and to the hashed name)."""
    if "module" in state:
        return state["module"]
    with lock:
        if "module" in state:
            return state["module"]
        module = None
        if not _disabled():
            try:
                from torch.utils.cpp_extension import load_inline

                module = load_inline(
                    name=_extension_name(prefix, source, extra_cflags + extra_ldflags),
                    cpp_sources=[source],
                    functions=functions,
                    extra_cflags=_build_flags() + list(extra_cflags),
                    extra_ldflags=list(extra_ldflags),
                    verbose=False,
                )
            except Exception as error:  # no compiler, no ninja, build error: fall back to PyTorch
                state["error"] = repr(error)
                module = None
        state["module"] = module
        return module


def extension_is_built(prefix: str, source: str, state: dict, extra_flags: tuple[str, ...] = ()) -> bool:
    """Whether ``load_extension(prefix, source, ...)`` would only load (loaded already, or cached on disk)."""
    if _disabled():
        return False
    if "module" in state:
        return state["module"] is not None
    name = _extension_name(prefix, source, extra_flags)
    try:
        return os.path.isfile(os.path.join(_build_directory(name), f"{name}.so"))
    except Exception:  # an unusual torch layout: report "not built" rather than fail
        return False

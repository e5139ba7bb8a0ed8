// Shared by jaxnorm's CPU kernels (rows.cc, cols.cc, groups.cc): element types with float32
// conversion, broadcasting of small operands, and a deterministic parallel loop on
// XLA's intra-op thread pool.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <string>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace jaxnorm {

// ----------------------------------------------------------------------------- dtypes

enum class bf16 : uint16_t {};  // a scalar type (not a struct): loops over it vectorise
using f16 = _Float16;
using Dims = xla::ffi::Span<const int64_t>;

inline float to_f32(float v) { return v; }
inline float to_f32(f16 v) { return static_cast<float>(v); }
inline float to_f32(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <class T> inline T from_f32(float v);
template <> inline float from_f32<float>(float v) { return v; }
template <> inline f16 from_f32<f16>(float v) { return static_cast<f16>(v); }
template <> inline bf16 from_f32<bf16>(float v) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet = (u >> 16) | 0x40u;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;  // a select, not a branch: vectorises
  return static_cast<bf16>(nan ? quiet : rounded);
}

// Eight float32 lanes (one AVX register), and loads that widen each element type.
// Explicit vectors: GCC's auto-vectoriser gives up on some of these loops.
typedef float V8 __attribute__((vector_size(8 * sizeof(float))));
typedef uint16_t U16x8 __attribute__((vector_size(8 * sizeof(uint16_t))));
typedef uint32_t U32x8 __attribute__((vector_size(8 * sizeof(uint32_t))));

inline V8 load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline V8 load8(const bf16* p) {  // bfloat16 is the top half of a float32
  U16x8 h;
  std::memcpy(&h, p, sizeof h);
  const U32x8 w = __builtin_convertvector(h, U32x8) << 16;
  V8 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
inline V8 load8(const f16* p) {
  float t[8];
  for (int i = 0; i < 8; ++i) t[i] = static_cast<float>(p[i]);
  return load8(t);
}
inline void store8(float* p, V8 v) { std::memcpy(p, &v, sizeof v); }

enum class Kind { kF32, kBF16, kF16, kOther };

inline Kind kind_of(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return Kind::kF32;
    case ffi::DataType::BF16: return Kind::kBF16;
    case ffi::DataType::F16: return Kind::kF16;
    default: return Kind::kOther;
  }
}

// Calls f(T{}) with T the element type of a float32, bfloat16 or float16 buffer (the
// kernels are templates over it); false for any other dtype.
template <class F>
inline bool with_float_type(ffi::DataType t, F&& f) {
  switch (kind_of(t)) {
    case Kind::kF32: f(float{}); return true;
    case Kind::kBF16: f(bf16{}); return true;
    case Kind::kF16: f(f16{}); return true;
    default: return false;
  }
}

// Calls f(T1{}, T2{}) with the element types of two float buffers (kernels templated
// over an input and an output or second input type).  Returns 0 on success, 1 if the
// first dtype is not float32/bfloat16/float16, 2 if the second is not.
template <class F>
inline int with_float_types(ffi::DataType t1, ffi::DataType t2, F&& f) {
  int bad = 0;
  if (!with_float_type(t1, [&](auto a) {
        if (!with_float_type(t2, [&](auto b) { f(a, b); })) bad = 2;
      }))
    bad = 1;
  return bad;
}

// ---------------------------------------------------------------------- prefetch

// Asks for `rows` row segments of `bytes` bytes, `stride` bytes apart from `p` on, to
// be brought into cache (a hint: no fault, no effect on results).  A loop that reads
// four short rows at a time, interleaved (the column sums: 8 columns of each), got
// 0.7x the bandwidth of a sequential read from the hardware prefetcher alone; asking
// for the rows ~16 KiB ahead brought it to 0.85-0.95x (2-core EPYC).
inline void prefetch_rows(const void* p, int64_t rows, int64_t stride, int64_t bytes) {
#if defined(__SSE__)
  const char* c = static_cast<const char*>(p);
  for (int64_t r = 0; r < rows; ++r, c += stride)
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
#else
  (void)p, (void)rows, (void)stride, (void)bytes;
#endif
}

// ------------------------------------------------------------------ column sums

// acc1 += sum over K rows of u, acc2 += sum of u * v, with u = a - sa, v = b - sb (or u),
// the K rows added pairwise first; rows are `stride` apart.  Vector body, scalar tail
// with the same per-element arithmetic.
template <int K, bool kSameAB, class TA, class TB>
inline void add_rows(const TA* a, const TB* b, int64_t stride, const float* sa, const float* sb,
                     float* acc1, float* acc2, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const V8 ka = load8(sa + i), kb = load8(sb + i);
    V8 u[K], p[K];
    for (int k = 0; k < K; ++k) {
      u[k] = load8(a + k * stride + i) - ka;
      p[k] = u[k] * (kSameAB ? u[k] : load8(b + k * stride + i) - kb);
    }
    V8 su = u[0], sp = p[0];
    if constexpr (K == 4) {
      su = (u[0] + u[1]) + (u[2] + u[3]);
      sp = (p[0] + p[1]) + (p[2] + p[3]);
    }
    store8(acc1 + i, load8(acc1 + i) + su);
    store8(acc2 + i, load8(acc2 + i) + sp);
  }
  for (; i < n; ++i) {
    float u[K], p[K];
    for (int k = 0; k < K; ++k) {
      u[k] = to_f32(a[k * stride + i]) - sa[i];
      p[k] = u[k] * (kSameAB ? u[k] : to_f32(b[k * stride + i]) - sb[i]);
    }
    float su = u[0], sp = p[0];
    if constexpr (K == 4) {
      su = (u[0] + u[1]) + (u[2] + u[3]);
      sp = (p[0] + p[1]) + (p[2] + p[3]);
    }
    acc1[i] += su;
    acc2[i] += sp;
  }
}

// Column sums over the rows [r0, r1) of a and b (rows `stride` elements apart, n
// columns from the pointers on): float32 over blocks of kSumBlockRows rows, K rows at
// a time (add_rows) then one by one, each block's sums added into tot1/tot2 in
// double.  The order of every addition depends on K and the row range alone.  With
// ahead > 0, the K rows `ahead` further on (of a, and of b if it is another operand)
// are prefetched while they are before row `end`.
constexpr int64_t kSumBlockRows = 128;

template <int K, bool kSameAB, class TA, class TB>
inline void sum_row_range(const TA* a, const TB* b, int64_t stride, int64_t r0, int64_t r1,
                          const float* sa, const float* sb, float* acc1, float* acc2,
                          double* tot1, double* tot2, int64_t n, int64_t ahead = 0,
                          int64_t end = 0) {
  for (int64_t b0 = r0; b0 < r1; b0 += kSumBlockRows) {
    std::fill(acc1, acc1 + n, 0.f);
    std::fill(acc2, acc2 + n, 0.f);
    const int64_t b1 = std::min(r1, b0 + kSumBlockRows);
    int64_t m = b0;
    for (; m + K <= b1; m += K) {
      if (ahead > 0 && m + ahead + K <= end) {
        prefetch_rows(a + (m + ahead) * stride, K, stride * sizeof(TA), n * sizeof(TA));
        if (!kSameAB)
          prefetch_rows(b + (m + ahead) * stride, K, stride * sizeof(TB), n * sizeof(TB));
      }
      add_rows<K, kSameAB>(a + m * stride, b + m * stride, stride, sa, sb, acc1, acc2, n);
    }
    for (; m < b1; ++m)
      add_rows<1, kSameAB>(a + m * stride, b + m * stride, stride, sa, sb, acc1, acc2, n);
    for (int64_t i = 0; i < n; ++i) {
      tot1[i] += acc1[i];
      tot2[i] += acc2[i];
    }
  }
}

// ---------------------------------------------------------------- streaming stores

// The size in bytes of the L3 cache that core 0 shares, from Linux's sysfs, else
// sysconf, else 32 MiB.  sysfs first: on a 2-core EPYC VM sysconf (glibc, from cpuid)
// said 256 MiB where sysfs and lscpu say 32 MiB, and the streaming threshold below
// was then 384 MiB, so outputs were never streamed.
inline int64_t sysfs_l3_bytes() {
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::FILE* f = std::fopen((dir + "level").c_str(), "r");
    if (!f) break;
    int level = 0;
    const bool ok = std::fscanf(f, "%d", &level) == 1;
    std::fclose(f);
    if (!ok || level != 3) continue;
    f = std::fopen((dir + "size").c_str(), "r");
    if (!f) return -1;
    long long v = 0;
    char unit = 0;
    const int n = std::fscanf(f, "%lld%c", &v, &unit);
    std::fclose(f);
    if (n < 1 || v <= 0) return -1;
    return v << (unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0);
  }
  return -1;
}

inline int64_t l3_bytes() {
  static const int64_t bytes = [] {
    int64_t l3 = sysfs_l3_bytes();
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (l3 <= 0) l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return l3 > 0 ? l3 : int64_t(32) << 20;
  }();
  return bytes;
}

// Outputs too large to stay in cache are written with non-temporal stores: they skip
// the read-for-ownership of every destination line (a write then costs one memory
// pass, not two) and do not evict the inputs.  When the output would still be in
// cache for its consumer they are slower, so they are used only when the arrays a
// kernel touches total at least stream_threshold() bytes: JAXNORM_STREAM_BYTES if
// set to an integer (0: always, negative: never; anything else is ignored), else
// 1.5 x the L3 cache, at most 48 MiB.  Measured on a 2-core EPYC (32 MiB L3), x * 2 + 1
// followed by a tanh: streaming loses at 32 MiB touched (1.69 vs 1.57 x XLA's fused
// pass) and wins from 48 MiB on (1.60 vs 1.77).  On a 2-core Xeon VM whose sysfs L3 is
// the whole socket's 105 MiB (shared with other tenants), streaming the layer norm's
// output won from 64 MiB touched (0.93-0.95 x the time, also with a tanh after it) and
// lost at 32 MiB (bfloat16, 1.10 x), hence the cap.
inline int64_t stream_threshold() {
  if (const char* e = std::getenv("JAXNORM_STREAM_BYTES"); e && *e) {
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    if (*end == '\0') return v < 0 ? INT64_MAX : static_cast<int64_t>(v);
  }
  return std::min(l3_bytes() * 3 / 2, int64_t(48) << 20);
}

// Copies n bytes from src (in cache) to dst with non-temporal stores where dst is
// aligned (plain stores for an unaligned head and a tail).  Call stream_fence()
// before the data is handed to another thread.
inline void stream_copy(void* dst, const void* src, size_t n) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
#if defined(__AVX__)
  constexpr size_t kW = 32;
#elif defined(__SSE2__)
  constexpr size_t kW = 16;
#else
  constexpr size_t kW = 0;
#endif
  if constexpr (kW > 0) {
    const size_t head = std::min(n, (kW - reinterpret_cast<uintptr_t>(d) % kW) % kW);
    std::memcpy(d, s, head);
    d += head, s += head, n -= head;
    for (; n >= kW; n -= kW, d += kW, s += kW) {
#if defined(__AVX__)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
#elif defined(__SSE2__)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
#endif
    }
  }
  std::memcpy(d, s, n);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Where a row kernel writes an output row: straight to memory, or (streaming) into a
// per-thread buffer in cache that flush() then streams out.
template <class T>
struct RowSink {
  bool stream;
  std::vector<T> buf;
  T* out = nullptr;
  int64_t n = 0;
  explicit RowSink(bool s) : stream(s) {}
  T* row(T* dst, int64_t len) {
    out = dst, n = len;
    if (!stream) return dst;
    buf.resize(len);
    return buf.data();
  }
  void flush() {
    if (stream && n > 0) stream_copy(out, buf.data(), n * sizeof(T));
  }
  ~RowSink() {
    if (stream) stream_fence();
  }
};

// ------------------------------------------------------------------- broadcasting

// Maps a row of x (flat index over x's leading axes) to a row of an operand of the
// same rank whose leading axes are either x's or 1.
struct RowMap {
  std::vector<int64_t> lead;     // x's leading dims
  std::vector<int64_t> strides;  // operand row strides, 0 where broadcast
  bool identity = true, constant = true;

  RowMap(const std::vector<int64_t>& x_lead, Dims dims) : lead(x_lead) {
    const size_t k = lead.size();
    strides.assign(k, 0);
    int64_t s = 1;
    for (size_t i = k; i-- > 0;) {
      const int64_t d = dims[i];
      strides[i] = (d == 1 && lead[i] != 1) ? 0 : s;
      if (d == 1 && lead[i] != 1) identity = false;
      if (d != 1) constant = false;
      s *= d;
    }
  }
  int64_t operator()(int64_t r) const {
    if (identity) return r;
    if (constant) return 0;
    int64_t off = 0;
    for (size_t i = lead.size(); i-- > 0;) {
      off += (r % lead[i]) * strides[i];
      r /= lead[i];
    }
    return off;
  }
};

// ----------------------------------------------------------------------- threads

// Runs body(b) for b in [0, nblocks) on the calling thread and num_threads() - 1
// helpers from the pool: as many workers as the pool has threads (one per core), not
// one more.  (With a helper per pool thread plus the caller, three workers shared two
// cores: the column sums ran at 0.7-0.8x the speed, batch-norm forward 1.71 vs 1.32
// floors.)  Blocks are claimed dynamically, but each block's result is independent
// of who runs it.
inline void parallel_for(ffi::ThreadPool& pool, int64_t nblocks, const std::function<void(int64_t)>& body) {
  if (nblocks <= 0) return;
  const int64_t nthreads = pool.num_threads();
  const int64_t helpers = std::min<int64_t>(nthreads - 1, nblocks - 1);
  if (helpers <= 0) {
    for (int64_t b = 0; b < nblocks; ++b) body(b);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::atomic<int64_t> active{0};
  };
  auto st = std::make_shared<State>();
  auto fn = std::make_shared<std::function<void(int64_t)>>(body);
  auto work = [st, fn, nblocks]() {
    st->active.fetch_add(1);
    for (;;) {
      int64_t b = st->next.fetch_add(1);
      if (b >= nblocks) break;
      (*fn)(b);
      st->done.fetch_add(1);
    }
    st->active.fetch_sub(1);
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  // Wait for blocks claimed by helpers (a helper that starts late finds none left).
  while (st->done.load() < nblocks) std::this_thread::yield();
  // `fn` may still be referenced by late helpers: it is kept alive by shared_ptr.
}

}  // namespace jaxnorm

// Fused CPU kernels for jaxnorm, registered as XLA FFI custom calls.
//
// Row kernels: layer norm (center=1) and RMS norm (center=0) over the trailing,
// contiguous axis of x, viewed as R rows of length C.  Every other operand has x's
// rank; along the leading axes it either matches x or has size 1 (broadcast), so
// per-sample parameters and vmap's size-1 axes need no copies.
//
//   forward   per row: m = sum(x) / n; d = sum(x - m) / n; v = sum((x - m)^2) / n - d^2
//             (the second pass reads the row from L1), rstd = 1 / sqrt(v + eps),
//             y = ((x - m) - d) * (rstd * scale) + bias.  Returns m, d, v per row.
//   backward  per row, the statistics recomputed from x by the forward's code (the row
//             is in L1, so this costs no memory traffic, and the forward's outputs can
//             be dropped by XLA when only the gradient is used); with
//             xc = (x - m) - d (or x without centring), gs = g * scale:
//             a1 = sum(gs), a2 = sum(gs * xc),
//             dx = rstd * ((gs - a1 / n) - (rstd^2 a2 / n) * xc) + (ct_d + 2 ct_v xc) / n,
//             -rstd^3 a2 / 2 (the row's share of the epsilon gradient), and per block
//             of rows the partial sums of g * xc * rstd (dscale) and g (dbias).
//
// Threads: XLA's intra-op pool (xla::ffi::ThreadPool).  Work is split into a fixed
// set of row blocks that depends only on the shapes; each block is computed by one
// thread in a fixed order, so results do not depend on the number of threads.
// Statistics are accumulated in float32 in 16 independent lanes (vectorised), then
// combined pairwise.  Outputs too large for the cache (y, dx) are written with
// non-temporal stores (common.h, stream_threshold).

#include "common.h"

namespace {

using namespace jaxnorm;

// -------------------------------------------------------------------- row helpers

constexpr int kLanes = 16;
// The row reductions keep 16 independent partial sums, lane j summing the elements
// i = j (mod 16), in two 8-float vectors (AVX registers; GCC's 64-byte vectors spill
// on AVX2).  So they vectorise without -ffast-math and the order of every addition
// is fixed by the row length alone.
inline V8 load(const float* p) { return load8(p); }

inline float combine(float* a) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) a[j] += a[j + w];
  return a[0];
}

struct Spill {  // the 16 lanes as an array, for the row's tail and the final combine
  float a[kLanes];
  Spill(V8 lo, V8 hi) {
    std::memcpy(a, &lo, sizeof lo);
    std::memcpy(a + 8, &hi, sizeof hi);
  }
};

inline float row_sum(const float* x, int64_t n) {
  V8 lo = {}, hi = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    lo += load(x + i);
    hi += load(x + i + 8);
  }
  Spill t(lo, hi);
  for (int j = 0; i < n; ++i, ++j) t.a[j] += x[i];
  return combine(t.a);
}

inline void row_centred_sums(const float* x, int64_t n, float m, float* s1, float* s2) {
  V8 a0 = {}, a1 = {}, b0 = {}, b1 = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const V8 u = load(x + i) - m, v = load(x + i + 8) - m;
    a0 += u;
    a1 += v;
    b0 += u * u;
    b1 += v * v;
  }
  Spill a(a0, a1), b(b0, b1);
  for (int j = 0; i < n; ++i, ++j) {
    const float v = x[i] - m;
    a.a[j] += v;
    b.a[j] += v * v;
  }
  *s1 = combine(a.a);
  *s2 = combine(b.a);
}

inline float row_sum_sq(const float* x, int64_t n) {
  V8 b0 = {}, b1 = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const V8 u = load(x + i), v = load(x + i + 8);
    b0 += u * u;
    b1 += v * v;
  }
  Spill b(b0, b1);
  for (int j = 0; i < n; ++i, ++j) b.a[j] += x[i] * x[i];
  return combine(b.a);
}

// The backward's one pass over a cached row once m is known (0 without centring):
// s1 = sum(x - m), s2 = sum((x - m)^2) (the lanes of row_centred_sums and, for m = 0,
// of row_sum_sq: the same bits), a1 = sum(gs) and a2 = sum(gs * (x - m)), gs = g * s
// (s may be null).
inline void row_centred_grad_sums(const float* x, const float* g, const float* s, int64_t n,
                                  float m, float* s1, float* s2, float* a1, float* a2) {
  V8 a0 = {}, a1v = {}, b0 = {}, b1 = {}, p0 = {}, p1 = {}, q0 = {}, q1 = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const V8 u = load(x + i) - m, v = load(x + i + 8) - m;
    V8 g0 = load(g + i), g1 = load(g + i + 8);
    if (s) {
      g0 *= load(s + i);
      g1 *= load(s + i + 8);
    }
    a0 += u;
    a1v += v;
    b0 += u * u;
    b1 += v * v;
    p0 += g0;
    p1 += g1;
    q0 += g0 * u;
    q1 += g1 * v;
  }
  Spill ta(a0, a1v), tb(b0, b1), tp(p0, p1), tq(q0, q1);
  for (int j = 0; i < n; ++i, ++j) {
    const float u = x[i] - m, gs = s ? g[i] * s[i] : g[i];
    ta.a[j] += u;
    tb.a[j] += u * u;
    tp.a[j] += gs;
    tq.a[j] += gs * u;
  }
  *s1 = combine(ta.a);
  *s2 = combine(tb.a);
  *a1 = combine(tp.a);
  *a2 = combine(tq.a);
}

// A row as float32: the data itself, or converted once into a per-thread buffer.
template <class T>
inline const float* as_f32(const T* p, int64_t n, std::vector<float>& buf) {
  buf.resize(n);
  for (int64_t i = 0; i < n; ++i) buf[i] = to_f32(p[i]);
  return buf.data();
}
template <>
inline const float* as_f32<float>(const float* p, int64_t, std::vector<float>&) { return p; }

std::vector<int64_t> leading(Dims d) {
  std::vector<int64_t> v;
  for (size_t i = 0; i + 1 < d.size(); ++i) v.push_back(d[i]);
  return v;
}

int64_t product(const std::vector<int64_t>& v) {
  int64_t p = 1;
  for (int64_t d : v) p *= d;
  return p;
}

enum Flags { kCenter = 1, kScale = 2, kBias = 4, kMask = 8 };

constexpr int64_t kRowsPerTask = 1 << 14;  // elements per forward task, in rows of C

// ---------------------------------------------------------------- row statistics

struct RowStats {
  float m = 0, d = 0, v = 0, rstd = 0;  // shift, offset, variance, 1 / sqrt(v + eps)
};

// d, v and rstd from the centred sums s1 = sum(x - m), s2 = sum((x - m)^2) of n values.
inline RowStats centred_stats(float m, float s1, float s2, float n, float eps) {
  RowStats st;
  st.m = m;
  st.d = s1 / n;
  st.v = s2 / n - st.d * st.d;
  st.v = st.v < 0 ? 0.f : st.v;  // NaN stays NaN
  st.rstd = 1.f / std::sqrt(st.v + eps);
  return st;
}

// v = s2 / n and rstd from s2 = sum(x^2) of n values (no centring: m = d = 0).
inline RowStats uncentred_stats(float s2, float n, float eps) {
  RowStats st;
  st.v = s2 / n;
  st.rstd = 1.f / std::sqrt(st.v + eps);
  return st;
}

// The statistics of one row (C > 0): m = sum(x) / n, then with the row in L1
// d = sum(x - m) / n and v = sum((x - m)^2) / n - d^2 (or v = sum(x^2) / n without
// centring).  The backward recomputes them with the same sums (row_sum, and the lanes
// of row_centred_sums or row_sum_sq inside row_centred_grad_sums) and centred_stats /
// uncentred_stats, so they are the forward kernel's bit for bit and nothing but x has
// to be kept for the backward.
inline RowStats row_stats(const float* xr, int64_t C, bool center, float eps) {
  const float n = static_cast<float>(C);
  if (center) {
    const float m = row_sum(xr, C) / n;
    float s1, s2;
    row_centred_sums(xr, C, m, &s1, &s2);
    return centred_stats(m, s1, s2, n, eps);
  }
  return uncentred_stats(row_sum_sq(xr, C), n, eps);
}

// ------------------------------------------------------------- parameter gradients

constexpr int kGroup = 4;  // rows whose parameter-gradient terms are added in one pass

// The rows of a group, for the partial sums of the parameter gradients.
struct RowGroup {
  int n = 0, n_in = 0;                            // rows; rows with statistics
  const float* g[kGroup];                         // every row's g (dbias)
  const float *gi[kGroup], *xi[kGroup];           // rows with statistics (dscale)
  float m[kGroup], d[kGroup], rstd[kGroup];
};

// pb += g and ps += g * (((x - m) - d) * rstd) over a group's rows, added row by row
// in order (the same sums, bit for bit, as one row at a time), reading and writing
// the partial sums once per group instead of once per row.
inline void add_partials(const RowGroup& rg, int64_t C, float* ps, float* pb) {
  int64_t k = 0;
  for (; k + 8 <= C; k += 8) {
    if (pb) {
      V8 a = load8(pb + k);
      for (int j = 0; j < rg.n; ++j) a += load8(rg.g[j] + k);
      store8(pb + k, a);
    }
    if (ps) {
      V8 a = load8(ps + k);
      for (int j = 0; j < rg.n_in; ++j)
        a += load8(rg.gi[j] + k) * (((load8(rg.xi[j] + k) - rg.m[j]) - rg.d[j]) * rg.rstd[j]);
      store8(ps + k, a);
    }
  }
  for (; k < C; ++k) {
    if (pb)
      for (int j = 0; j < rg.n; ++j) pb[k] += rg.g[j][k];
    if (ps)
      for (int j = 0; j < rg.n_in; ++j)
        ps[k] += rg.gi[j][k] * (((rg.xi[j][k] - rg.m[j]) - rg.d[j]) * rg.rstd[j]);
  }
}

// ------------------------------------------------------------------------ forward

template <class TX, class TY>
void rows_fwd(ffi::ThreadPool& pool, int flags, const TX* x, TY* y, int64_t R, int64_t C,
              const float* scale, const RowMap& smap, const float* bias, const RowMap& bmap,
              const bool* mask, const RowMap& mmap, const float* eps, const RowMap& emap,
              float* km, float* kd, float* kv) {
  const bool center = flags & kCenter;
  const bool stream = R * C * int64_t(sizeof(TX) + sizeof(TY)) >= stream_threshold();
  const int64_t per = std::max<int64_t>(1, kRowsPerTask / std::max<int64_t>(C, 1));
  const int64_t ntasks = (R + per - 1) / per;
  parallel_for(pool, ntasks, [&](int64_t t) {
    std::vector<float> buf;
    RowSink<TY> sink(stream);
    const int64_t r1 = std::min(R, (t + 1) * per);
    for (int64_t r = t * per; r < r1; ++r) {
      const float* xr = as_f32(x + r * C, C, buf);
      const bool in = !(flags & kMask) || mask[mmap(r)];
      const RowStats st = in && C > 0 ? row_stats(xr, C, center, eps[emap(r)]) : RowStats();
      const float m = st.m, d = st.d, rstd = st.rstd;
      km[r] = m;
      kd[r] = d;
      kv[r] = st.v;
      const float* s = (flags & kScale) ? scale + smap(r) * C : nullptr;
      const float* b = (flags & kBias) ? bias + bmap(r) * C : nullptr;
      TY* yr = sink.row(y + r * C, C);
      if (s && b) {
        for (int64_t i = 0; i < C; ++i) yr[i] = from_f32<TY>(((xr[i] - m) - d) * (rstd * s[i]) + b[i]);
      } else if (s) {
        for (int64_t i = 0; i < C; ++i) yr[i] = from_f32<TY>(((xr[i] - m) - d) * (rstd * s[i]));
      } else if (b) {
        for (int64_t i = 0; i < C; ++i) yr[i] = from_f32<TY>(((xr[i] - m) - d) * rstd + b[i]);
      } else {
        for (int64_t i = 0; i < C; ++i) yr[i] = from_f32<TY>(((xr[i] - m) - d) * rstd);
      }
      sink.flush();
    }
  });
}

// ----------------------------------------------------------------------- backward

template <class TX, class TG>
void rows_bwd(ffi::ThreadPool& pool, int flags, const TX* x, const TG* g, TX* dx, int64_t R,
              int64_t C, const float* scale, const RowMap& smap, const bool* mask,
              const RowMap& mmap, const float* eps, const RowMap& emap, const float* ctd,
              const RowMap& ctdmap, const float* ctv, const RowMap& ctvmap, float* deps,
              float* pscale, float* pbias, int64_t groups, int64_t nb) {
  const bool center = flags & kCenter;
  const bool want_partials = (flags & (kScale | kBias)) && nb > 0;
  const int64_t rg = groups > 0 ? R / groups : 0;  // rows per parameter group
  // Fixed blocks: nb per group (partials), or by size when no partials are wanted.
  int64_t blk, nblocks;
  if (want_partials) {
    blk = (rg + nb - 1) / nb;
    nblocks = groups * nb;
  } else {
    blk = std::max<int64_t>(1, kRowsPerTask / std::max<int64_t>(C, 1));
    nblocks = (R + blk - 1) / blk;
  }
  const bool stream = R * C * int64_t(2 * sizeof(TX) + sizeof(TG)) >= stream_threshold();
  parallel_for(pool, nblocks, [&](int64_t t) {
    std::vector<float> xbuf[kGroup], gbuf[kGroup];
    RowSink<TX> sink(stream);
    int64_t r0, r1;
    float *ps = nullptr, *pb = nullptr;
    if (want_partials) {
      const int64_t grp = t / nb, j = t % nb;
      r0 = grp * rg + std::min(rg, j * blk);
      r1 = grp * rg + std::min(rg, (j + 1) * blk);
      if (flags & kScale) { ps = pscale + t * C; std::fill(ps, ps + C, 0.f); }
      if (flags & kBias) { pb = pbias + t * C; std::fill(pb, pb + C, 0.f); }
    } else {
      r0 = t * blk;
      r1 = std::min(R, r0 + blk);
    }
    const float inv_n = 1.f / static_cast<float>(std::max<int64_t>(C, 1));
    for (int64_t r_first = r0; r_first < r1; r_first += kGroup) {
      RowGroup group;
      group.n = static_cast<int>(std::min<int64_t>(kGroup, r1 - r_first));
      for (int j = 0; j < group.n; ++j) {
        const int64_t r = r_first + j;
        const float* xr = as_f32(x + r * C, C, xbuf[j]);
        const float* gr = as_f32(g + r * C, C, gbuf[j]);
        const float* s = (flags & kScale) ? scale + smap(r) * C : nullptr;
        const bool in = !(flags & kMask) || mask[mmap(r)];
        TX* dxr = sink.row(dx + r * C, C);
        group.g[j] = gr;
        if (!in || C == 0) {  // no statistics: y = bias, zero gradient to x
          for (int64_t i = 0; i < C; ++i) dxr[i] = from_f32<TX>(0.f);
          sink.flush();
          deps[r] = 0.f;
          continue;
        }
        // The statistics (the forward kernel's, bit for bit) and the gradient sums: the
        // statistics' (second) pass and the sums share one pass over the cached row,
        // a2 = sum(gs * (x - m)) - d * a1 = sum(gs * ((x - m) - d)).
        const float n = static_cast<float>(C);
        const float m0 = center ? row_sum(xr, C) / n : 0.f;
        float s1, s2, a1, a2m;
        row_centred_grad_sums(xr, gr, s, C, m0, &s1, &s2, &a1, &a2m);
        const RowStats st = center ? centred_stats(m0, s1, s2, n, eps[emap(r)])
                                   : uncentred_stats(s2, n, eps[emap(r)]);
        const float a2 = a2m - st.d * a1;  // st.d = 0 without centring
        const float m = st.m, d = st.d, rstd = st.rstd;
        deps[r] = -0.5f * (rstd * rstd * rstd) * a2;  // this row's share of d(loss)/d(eps)
        // dx = rstd * ((gs - a1 / n) - (rstd^2 a2 / n) * xc) + (ct_d + 2 ct_v xc) / n:
        // gs - a1 / n first, so the cancellation happens before the scaling by rstd.
        const float mg = center ? a1 * inv_n : 0.f;
        const float q = rstd * rstd * a2 * inv_n;
        const float e0 = center ? ctd[ctdmap(r)] * inv_n : 0.f;
        const float e1 = 2.f * ctv[ctvmap(r)] * inv_n;
        if (s) {
          for (int64_t k = 0; k < C; ++k) {
            const float xc = (xr[k] - m) - d;
            dxr[k] = from_f32<TX>(rstd * ((gr[k] * s[k] - mg) - q * xc) + (e0 + e1 * xc));
          }
        } else {
          for (int64_t k = 0; k < C; ++k) {
            const float xc = (xr[k] - m) - d;
            dxr[k] = from_f32<TX>(rstd * ((gr[k] - mg) - q * xc) + (e0 + e1 * xc));
          }
        }
        sink.flush();
        const int i = group.n_in++;
        group.gi[i] = gr, group.xi[i] = xr;
        group.m[i] = m, group.d[i] = d, group.rstd[i] = rstd;
      }
      if (ps || pb) add_partials(group, C, ps, pb);
    }
  });
}

// ------------------------------------------------------------------------ handlers

ffi::Error check_f32(const ffi::AnyBuffer& b, const char* what) {
  if (b.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument(std::string("jaxnorm kernel: ") + what + " must be float32");
  return ffi::Error::Success();
}

ffi::Error RowsFwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                       ffi::AnyBuffer bias, ffi::AnyBuffer mask, ffi::AnyBuffer eps,
                       ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> km,
                       ffi::Result<ffi::AnyBuffer> kd, ffi::Result<ffi::AnyBuffer> kv,
                       int32_t flags) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("jaxnorm kernel: x must have rank >= 1");
  const int64_t C = dims[dims.size() - 1];
  const auto lead = leading(dims);
  const int64_t R = product(lead);
  for (auto* b : {&scale, &bias, &eps})
    if (auto e = check_f32(*b, "scale/bias/epsilon"); e.failure()) return e;
  if (mask.element_type() != ffi::DataType::PRED)
    return ffi::Error::InvalidArgument("jaxnorm kernel: mask must be bool");
  RowMap smap(lead, scale.dimensions()), bmap(lead, bias.dimensions()),
      mmap(lead, mask.dimensions()), emap(lead, eps.dimensions());
  const float* s = static_cast<const float*>(scale.untyped_data());
  const float* b = static_cast<const float*>(bias.untyped_data());
  const bool* m = static_cast<const bool*>(mask.untyped_data());
  const float* e = static_cast<const float*>(eps.untyped_data());
  float* o[3] = {static_cast<float*>(km->untyped_data()), static_cast<float*>(kd->untyped_data()),
                 static_cast<float*>(kv->untyped_data())};
  const int bad = with_float_types(x.element_type(), y->element_type(), [&](auto tx, auto ty) {
    using TX = decltype(tx);
    using TY = decltype(ty);
    rows_fwd<TX, TY>(pool, flags, static_cast<const TX*>(x.untyped_data()),
                     static_cast<TY*>(y->untyped_data()), R, C, s, smap, b, bmap, m, mmap, e,
                     emap, o[0], o[1], o[2]);
  });
  if (bad == 1) return ffi::Error::InvalidArgument("jaxnorm kernel: unsupported input dtype");
  if (bad == 2) return ffi::Error::InvalidArgument("jaxnorm kernel: unsupported output dtype");
  return ffi::Error::Success();
}

ffi::Error RowsBwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g,
                       ffi::AnyBuffer scale, ffi::AnyBuffer mask, ffi::AnyBuffer eps,
                       ffi::AnyBuffer ctd, ffi::AnyBuffer ctv, ffi::Result<ffi::AnyBuffer> dx,
                       ffi::Result<ffi::AnyBuffer> deps, ffi::Result<ffi::AnyBuffer> pscale,
                       ffi::Result<ffi::AnyBuffer> pbias, int32_t flags) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("jaxnorm kernel: x must have rank >= 1");
  const int64_t C = dims[dims.size() - 1];
  const auto lead = leading(dims);
  const int64_t R = product(lead);
  for (auto* b : {&scale, &eps, &ctd, &ctv})
    if (auto e = check_f32(*b, "scale/epsilon/cotangents"); e.failure()) return e;
  if (mask.element_type() != ffi::DataType::PRED)
    return ffi::Error::InvalidArgument("jaxnorm kernel: mask must be bool");
  // Partials: (groups..., nb, C) -- one row of C per block of rows of each group.
  auto pd = pscale->dimensions();
  if (pd.size() < 2) return ffi::Error::InvalidArgument("jaxnorm kernel: bad partials rank");
  const int64_t nb = pd[pd.size() - 2];
  int64_t groups = 1;
  for (size_t i = 0; i + 2 < pd.size(); ++i) groups *= pd[i];
  if (groups > 0 && R % groups != 0)
    return ffi::Error::InvalidArgument("jaxnorm kernel: partial groups do not divide the rows");
  RowMap smap(lead, scale.dimensions()), mmap(lead, mask.dimensions()),
      emap(lead, eps.dimensions()), ctdmap(lead, ctd.dimensions()),
      ctvmap(lead, ctv.dimensions());
  const float* s = static_cast<const float*>(scale.untyped_data());
  const bool* m = static_cast<const bool*>(mask.untyped_data());
  const float* e = static_cast<const float*>(eps.untyped_data());
  const float* cd = static_cast<const float*>(ctd.untyped_data());
  const float* cv = static_cast<const float*>(ctv.untyped_data());
  float* dep = static_cast<float*>(deps->untyped_data());
  float* ps = static_cast<float*>(pscale->untyped_data());
  float* pb = static_cast<float*>(pbias->untyped_data());
  if (kind_of(dx->element_type()) != kind_of(x.element_type()))
    return ffi::Error::InvalidArgument("jaxnorm kernel: dx must have x's dtype");
  const int bad = with_float_types(x.element_type(), g.element_type(), [&](auto tx, auto tg) {
    using TX = decltype(tx);
    using TG = decltype(tg);
    rows_bwd<TX, TG>(pool, flags, static_cast<const TX*>(x.untyped_data()),
                     static_cast<const TG*>(g.untyped_data()),
                     static_cast<TX*>(dx->untyped_data()), R, C, s, smap, m, mmap, e, emap, cd,
                     ctdmap, cv, ctvmap, dep, ps, pb, groups, nb);
  });
  if (bad == 1) return ffi::Error::InvalidArgument("jaxnorm kernel: unsupported input dtype");
  if (bad == 2) return ffi::Error::InvalidArgument("jaxnorm kernel: unsupported cotangent dtype");
  return ffi::Error::Success();
}

// The second floor of the benchmarks: y = x * 2 + 1 (float32), one read and one write.
ffi::Error Axpb(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t n = static_cast<int64_t>(x.element_count());
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t per = kRowsPerTask;
  parallel_for(pool, (n + per - 1) / per, [&](int64_t t) {
    const int64_t i1 = std::min(n, (t + 1) * per);
    for (int64_t i = t * per; i < i1; ++i) yp[i] = xp[i] * 2.f + 1.f;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormRowsFwd, RowsFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()   // x
                                  .Arg<ffi::AnyBuffer>()   // scale (f32)
                                  .Arg<ffi::AnyBuffer>()   // bias (f32)
                                  .Arg<ffi::AnyBuffer>()   // mask (bool, per row)
                                  .Arg<ffi::AnyBuffer>()   // epsilon (f32, per row)
                                  .Ret<ffi::AnyBuffer>()   // y
                                  .Ret<ffi::AnyBuffer>()   // mean (shift)
                                  .Ret<ffi::AnyBuffer>()   // offset
                                  .Ret<ffi::AnyBuffer>()   // var
                                  .Attr<int32_t>("flags"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormRowsBwd, RowsBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()   // x
                                  .Arg<ffi::AnyBuffer>()   // g
                                  .Arg<ffi::AnyBuffer>()   // scale
                                  .Arg<ffi::AnyBuffer>()   // mask
                                  .Arg<ffi::AnyBuffer>()   // epsilon (f32, per row)
                                  .Arg<ffi::AnyBuffer>()   // ct of offset
                                  .Arg<ffi::AnyBuffer>()   // ct of var
                                  .Ret<ffi::AnyBuffer>()   // dx
                                  .Ret<ffi::AnyBuffer>()   // d(loss)/d(eps) per row
                                  .Ret<ffi::AnyBuffer>()   // dscale partials
                                  .Ret<ffi::AnyBuffer>()   // dbias partials
                                  .Attr<int32_t>("flags"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormAxpb, Axpb,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

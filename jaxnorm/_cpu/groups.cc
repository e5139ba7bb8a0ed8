// Group norm and instance norm backward with the features minor (NHWC), fused: the
// gradient of x and the parameter sums of one sample's groups from one read of x and
// g in memory.
//
// x and g are viewed as (S, M, L): S samples (the axes before `begin`), M positions
// (the reduced axes [begin, end)), L features after them, in G = L / Cg groups of Cg
// adjacent features (group norm on (N, H, W, G, Cg); instance norm: Cg = 1).  Per
// sample s and group, with its statistics k (shift), d (offset), rstd and the
// cotangents ct_d, ct_v of the offset and variance (operand `stats`, (5, S, G)),
// n = M * Cg, xc = (x - k) - d (x without centring), s_c the scale:
//
//   t1[s, c] = sum_m g,   t2[s, c] = sum_m g * xc                     (per feature)
//   a1 = sum_{c in group} t1 s_c,   a2 = sum_{c in group} t2 s_c       (in double)
//   c0 = ct_d - rstd a1,   c1 = 2 ct_v - rstd^3 a2
//   dx = g * (s_c rstd) + (c0 + c1 * xc) / n
//
// -- jaxnorm._vjp's backward for these layouts.  t1 and t2 are returned (float32) for
// the parameter gradients (dbias = sum_s t1, dscale = sum_s t2 rstd) and epsilon's.
//
// Partition: a task is one sample, so the dx pass reads its x and g from cache: x and
// g are read from memory once, dx written once (streaming stores when large).  The
// caller (_groups.covers) sends only samples whose x and g fit in a quarter of the L3
// cache.  (Splitting a larger sample's features into cache-sized chunks made rows of a
// few cache lines at a stride, slower than the XLA path: (8, 64, 64, 128) float32
// fwd+bwd took 5.3 floors in 1 MiB chunks, 2.8 whole, 5.5 on the XLA path.)  The sums
// are taken as in cols.cc (float32 per block of rows, double across), each task alone
// in a fixed order: results do not depend on the number of threads.

#include <type_traits>

#include "common.h"

namespace {

using namespace jaxnorm;

enum Flags { kCenter = 1, kScale = 2 };

constexpr int64_t kPrefetchBytes = 16 << 10;

template <class TX, class TG>
void groups_bwd(ffi::ThreadPool& pool, int flags, const TX* x, const TG* g, TX* dx, int64_t S,
                int64_t M, int64_t L, int64_t Cg, const float* stats, const float* scale,
                float* t1, float* t2) {
  const bool center = flags & kCenter;
  const int64_t G = L / Cg;
  const float *sk = stats, *sd = sk + S * G, *sr = sd + S * G, *sctd = sr + S * G,
              *sctv = sctd + S * G;
  const bool stream = S * M * L * int64_t(2 * sizeof(TX) + sizeof(TG)) >= stream_threshold();
  const int64_t ahead = std::max<int64_t>(  // rows: kPrefetchBytes of x and g
      1, kPrefetchBytes / std::max<int64_t>(1, L * int64_t(sizeof(TX) + sizeof(TG))));
  parallel_for(pool, S, [&](int64_t s) {
    const TX* xs = x + s * M * L;
    const TG* gs = g + s * M * L;
    TX* dxs = dx + s * M * L;
    std::vector<float> f(8 * L);
    float *zero = f.data(), *k = zero + L, *acc1 = k + L, *acc2 = acc1 + L, *d = acc2 + L,
          *a = d + L, *c0 = a + L, *c1 = c0 + L;
    std::vector<double> tot(2 * L, 0.0);
    double *u1 = tot.data(), *u2 = u1 + L;
    for (int64_t c = 0; c < L; ++c) {
      const int64_t i = s * G + c / Cg;
      zero[c] = 0.f;
      k[c] = center ? sk[i] : 0.f;
      d[c] = center ? sd[i] : 0.f;
    }
    // pass 1 (x and g from memory): sum g and g * (x - k) per feature, row by row and
    // reading ahead, as cols.cc does for two operands (four rows at a time: 1.15x)
    sum_row_range<1, false>(gs, xs, L, 0, M, zero, k, acc1, acc2, u1, u2, L, ahead, M);
    for (int64_t c = 0; c < L; ++c) {
      u2[c] -= static_cast<double>(d[c]) * u1[c];  // sum g * ((x - k) - d)
      t1[s * L + c] = static_cast<float>(u1[c]);
      t2[s * L + c] = static_cast<float>(u2[c]);
    }
    for (int64_t c_first = 0; c_first < L; c_first += Cg) {  // per group
      const int64_t i = s * G + c_first / Cg;
      double a1 = 0, a2 = 0;
      for (int64_t c = c_first; c < c_first + Cg; ++c) {
        const double sc = (flags & kScale) ? scale[c] : 1.0;
        a1 += u1[c] * sc;
        a2 += u2[c] * sc;
      }
      const float rstd = sr[i];
      const float g0c = center ? static_cast<float>(sctd[i] - rstd * a1) : 0.f;
      const float g1c = static_cast<float>(2.0 * sctv[i] - double(rstd) * rstd * rstd * a2);
      for (int64_t c = c_first; c < c_first + Cg; ++c) {
        a[c] = ((flags & kScale) ? scale[c] : 1.f) * rstd;
        c0[c] = g0c;
        c1[c] = g1c;
      }
    }
    // pass 2 (x and g from cache): dx = g * a + (c0 + c1 * xc) / n
    RowSink<TX> sink(stream);
    std::vector<float> row(std::is_same_v<TX, float> ? 0 : L);
    const float inv_n = 1.f / static_cast<float>(M * Cg);  // local: kept in a register
    for (int64_t m = 0; m < M; ++m) {
      const TX* xr = xs + m * L;
      const TG* gr = gs + m * L;
      TX* out = sink.row(dxs + m * L, L);
      float* v = std::is_same_v<TX, float> ? reinterpret_cast<float*>(out) : row.data();
      int64_t c = 0;
      for (; c + 8 <= L; c += 8) {
        const V8 xc = (load8(xr + c) - load8(k + c)) - load8(d + c);
        store8(v + c, load8(gr + c) * load8(a + c) + (load8(c0 + c) + load8(c1 + c) * xc) * inv_n);
      }
      for (; c < L; ++c) {
        const float xc = (to_f32(xr[c]) - k[c]) - d[c];
        v[c] = to_f32(gr[c]) * a[c] + (c0[c] + c1[c] * xc) * inv_n;
      }
      if constexpr (!std::is_same_v<TX, float>)
        for (c = 0; c < L; ++c) out[c] = from_f32<TX>(v[c]);
      sink.flush();
    }
  });
}

ffi::Error GroupsBwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g,
                         ffi::AnyBuffer stats, ffi::AnyBuffer scale,
                         ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> t1,
                         ffi::Result<ffi::AnyBuffer> t2, int32_t flags, int32_t begin,
                         int32_t end, int32_t group) {
  auto dims = x.dimensions();
  const int64_t rank = static_cast<int64_t>(dims.size());
  if (begin < 0 || begin >= end || end > rank || group < 1 ||
      g.dimensions().size() != dims.size())
    return ffi::Error::InvalidArgument("jaxnorm groups backward: bad axes or group size");
  int64_t S = 1, M = 1, L = 1;
  for (int64_t i = 0; i < rank; ++i) {
    if (g.dimensions()[i] != dims[i])
      return ffi::Error::InvalidArgument("jaxnorm groups backward: x and g differ in shape");
    (i < begin ? S : i < end ? M : L) *= dims[i];
  }
  if (L % group != 0)
    return ffi::Error::InvalidArgument("jaxnorm groups backward: the group size does not "
                                       "divide the features");
  if (stats.element_type() != ffi::DataType::F32 || scale.element_type() != ffi::DataType::F32 ||
      static_cast<int64_t>(stats.element_count()) != 5 * S * (L / group) ||
      ((flags & kScale) && static_cast<int64_t>(scale.element_count()) != L))
    return ffi::Error::InvalidArgument("jaxnorm groups backward: stats must be (5, S, G) and "
                                       "scale (L,), float32");
  const float* st = static_cast<const float*>(stats.untyped_data());
  const float* sc = static_cast<const float*>(scale.untyped_data());
  float* o1 = static_cast<float*>(t1->untyped_data());
  float* o2 = static_cast<float*>(t2->untyped_data());
  if (x.element_type() != dx->element_type())
    return ffi::Error::InvalidArgument("jaxnorm groups backward: dx must have x's dtype");
  const int bad = with_float_types(x.element_type(), g.element_type(), [&](auto tx, auto tg) {
    using TX = decltype(tx);
    using TG = decltype(tg);
    groups_bwd<TX, TG>(pool, flags, static_cast<const TX*>(x.untyped_data()),
                       static_cast<const TG*>(g.untyped_data()),
                       static_cast<TX*>(dx->untyped_data()), S, M, L, group, st, sc, o1, o2);
  });
  if (bad) return ffi::Error::InvalidArgument("jaxnorm groups backward: unsupported dtype");
  return ffi::Error::Success();
}

}  // namespace

// For _groups.max_sample_bytes: the cache size the kernels see.
extern "C" int64_t jaxnorm_l3_bytes() { return l3_bytes(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormGroupsBwd, GroupsBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()   // x: axes [begin, end) reduced
                                  .Arg<ffi::AnyBuffer>()   // g, x's shape
                                  .Arg<ffi::AnyBuffer>()   // stats (5, S, G) f32: k, d,
                                                           // rstd, ct_d, ct_v
                                  .Arg<ffi::AnyBuffer>()   // scale (L,) f32 (or (1,))
                                  .Ret<ffi::AnyBuffer>()   // dx, x's shape and dtype
                                  .Ret<ffi::AnyBuffer>()   // t1 (S, L) f32
                                  .Ret<ffi::AnyBuffer>()   // t2 (S, L) f32
                                  .Attr<int32_t>("flags")
                                  .Attr<int32_t>("begin")
                                  .Attr<int32_t>("end")
                                  .Attr<int32_t>("group"));

// Column sums for jaxnorm: the statistics of batch, group and instance norm with the
// features minor (NHWC), in one pass over the data.
//
// The operands a and b (same shape) are viewed as (S, M, L): M the axes [begin, end),
// S those before, L those after.  Sums run over M, one result per (s, l).  With shifts ka, kb of shape (S or 1, 1, L or 1):
//
//   s1[s, l] = sum_m (a[s, m, l] - ka[s, l])
//   s2[s, l] = sum_m (a[s, m, l] - ka[s, l]) * (b[s, m, l] - kb[s, l])
//
// Forward statistics: a = b = x, ka = kb = the shift (a data value near the mean), so
// s1 / n is the offset of the mean from the shift and s2 / n - (s1 / n)^2 the variance
// (flag kSame: b is a, read once).  Backward: a = g, ka = 0, b = x, kb = the shift:
// sum(g) and sum(g * (x - shift)) together, reading g and x once.  XLA:CPU computes
// each of these sums as its own pass over memory; here the pair costs one.
//
// Partition: tasks are (s, chunk of L, block of M), fixed by the shapes alone.  Each
// task sums its rows per column in float32 (vectorised along the contiguous L) over
// 128 rows at a time, adding those into double; the task totals are added in double,
// in block order: results do not depend on the number of threads.

#include "common.h"

namespace {

using namespace jaxnorm;

enum Flags { kSame = 1 };

constexpr int64_t kTaskElems = 1 << 16;  // elements per task (256 KiB of float32)
constexpr int64_t kMaxChunk = 2048;       // columns per task: whole rows up to this stream best
constexpr int64_t kPrefetchBytes = 16 << 10;  // how far ahead to read (moments, short rows)
constexpr int64_t kPrefetchMaxRow = 2048;     // bytes per row up to which that helps

struct Shift {  // a shift operand of shape (S or 1, 1, L or 1)
  const float* p;
  int64_t s_stride, l_stride;
  Shift(const ffi::AnyBuffer& b, int64_t S, int64_t L) : p(static_cast<const float*>(b.untyped_data())) {
    auto d = b.dimensions();
    const int64_t bs = d[0], bl = d[2];
    l_stride = (bl == 1 && L != 1) ? 0 : 1;
    s_stride = (bs == 1 && S != 1) ? 0 : bl;
  }
  float at(int64_t s, int64_t l) const { return p[s * s_stride + l * l_stride]; }
};

template <class TA, class TB>
void column_sums(ffi::ThreadPool& pool, int flags, const TA* a, const TB* b, int64_t S,
                 int64_t M, int64_t L, const Shift& ka, const Shift& kb, float* s1, float* s2) {
  const bool same = flags & kSame;
  const int64_t chunk = std::min(L, kMaxChunk);
  const int64_t nchunks = (L + chunk - 1) / chunk;
  const int64_t per_task = kTaskElems / chunk;  // rows per task: a multiple of kSumBlockRows
  const int64_t rows = std::max<int64_t>(1, per_task / kSumBlockRows) * kSumBlockRows;
  const int64_t nblocks = (M + rows - 1) / rows;
  // Task totals, (S, nblocks, L) each, in double.
  const size_t np = static_cast<size_t>(S * nblocks * L);
  std::unique_ptr<double[]> p1(new double[np]), p2(new double[np]);
  // Moments (one operand): four rows at a time; two operands (the backward's g and
  // x): row by row, a sequential read of each row (four rows at a time measured
  // 1.5-1.7x the time for rows of 128-256 float32, alike at 64 and 1024).  Over rows
  // of at most kPrefetchMaxRow bytes, reading ahead explicitly (kPrefetchBytes) helps
  // both: 16 MiB float32 as (4M / L, L), moments 0.76-0.94x the time for L = 64..512
  // (1.02-1.14x for L >= 1024: whole pages, which the hardware prefetcher follows
  // well), two operands 0.91-0.93x for L = 64..256 (1.2x at 1024).
  const int64_t row_bytes = chunk * static_cast<int64_t>(sizeof(TA));
  const bool read_ahead = row_bytes <= kPrefetchMaxRow;
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / (4 * row_bytes)) * 4;
  const int64_t ahead2 =
      std::max<int64_t>(1, kPrefetchBytes / (chunk * int64_t(sizeof(TA) + sizeof(TB))));
  parallel_for(pool, S * nchunks * nblocks, [&](int64_t t) {
    const int64_t blk = t % nblocks, c = (t / nblocks) % nchunks, s = t / (nblocks * nchunks);
    const int64_t l0 = c * chunk, n = std::min(L, l0 + chunk) - l0;
    const int64_t m0 = blk * rows, m1 = std::min(M, m0 + rows);
    std::vector<float> buf(4 * n);
    float *sa = buf.data(), *sb = sa + n, *acc1 = sb + n, *acc2 = acc1 + n;
    double* q1 = p1.get() + (s * nblocks + blk) * L + l0;
    double* q2 = p2.get() + (s * nblocks + blk) * L + l0;
    for (int64_t i = 0; i < n; ++i) {
      sa[i] = ka.at(s, l0 + i);
      sb[i] = kb.at(s, l0 + i);
      q1[i] = 0;
      q2[i] = 0;
    }
    const TA* as = a + s * M * L + l0;
    const TB* bs = b + s * M * L + l0;
    if (same)
      sum_row_range<4, true>(as, bs, L, m0, m1, sa, sb, acc1, acc2, q1, q2, n,
                             read_ahead ? ahead : 0, M);
    else
      sum_row_range<1, false>(as, bs, L, m0, m1, sa, sb, acc1, acc2, q1, q2, n,
                              read_ahead ? ahead2 : 0, M);
  });
  // Add the task totals in block order; tasks are (s, chunk of L).
  parallel_for(pool, S * nchunks, [&](int64_t t) {
    const int64_t c = t % nchunks, s = t / nchunks;
    const int64_t l0 = c * chunk, l1 = std::min(L, l0 + chunk);
    for (int64_t l = l0; l < l1; ++l) {
      double t1 = 0, t2 = 0;
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        t1 += p1[(s * nblocks + blk) * L + l];
        t2 += p2[(s * nblocks + blk) * L + l];
      }
      s1[s * L + l] = static_cast<float>(t1);
      s2[s * L + l] = static_cast<float>(t2);
    }
  });
}

ffi::Error ColumnSumsImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer ka,
                          ffi::AnyBuffer b, ffi::AnyBuffer kb, ffi::Result<ffi::AnyBuffer> s1,
                          ffi::Result<ffi::AnyBuffer> s2, int32_t flags, int32_t begin,
                          int32_t end) {
  auto d = a.dimensions();
  const int64_t rank = static_cast<int64_t>(d.size());
  if (begin < 0 || begin >= end || end > rank || b.dimensions().size() != d.size() ||
      ka.dimensions().size() != 3 || kb.dimensions().size() != 3)
    return ffi::Error::InvalidArgument("jaxnorm column sums: bad operand ranks or axes");
  int64_t S = 1, M = 1, L = 1;
  for (int64_t i = 0; i < rank; ++i) {
    if (b.dimensions()[i] != d[i])
      return ffi::Error::InvalidArgument("jaxnorm column sums: a and b differ in shape");
    (i < begin ? S : i < end ? M : L) *= d[i];
  }
  if (ka.element_type() != ffi::DataType::F32 || kb.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("jaxnorm column sums: shifts must be float32");
  Shift sa(ka, S, L), sb(kb, S, L);
  float* o1 = static_cast<float*>(s1->untyped_data());
  float* o2 = static_cast<float*>(s2->untyped_data());
  const int bad = with_float_types(a.element_type(), b.element_type(), [&](auto ta, auto tb) {
    using TA = decltype(ta);
    using TB = decltype(tb);
    column_sums<TA, TB>(pool, flags, static_cast<const TA*>(a.untyped_data()),
                        static_cast<const TB*>(b.untyped_data()), S, M, L, sa, sb, o1, o2);
  });
  if (bad) return ffi::Error::InvalidArgument("jaxnorm column sums: unsupported dtype");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnormColumnSums, ColumnSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()   // a: axes [begin, end) reduced
                                  .Arg<ffi::AnyBuffer>()   // ka (S|1, 1, L|1), f32
                                  .Arg<ffi::AnyBuffer>()   // b, a's shape
                                  .Arg<ffi::AnyBuffer>()   // kb (S|1, 1, L|1), f32
                                  .Ret<ffi::AnyBuffer>()   // s1 (S, 1, L), f32
                                  .Ret<ffi::AnyBuffer>()   // s2 (S, 1, L), f32
                                  .Attr<int32_t>("flags")
                                  .Attr<int32_t>("begin")
                                  .Attr<int32_t>("end"));

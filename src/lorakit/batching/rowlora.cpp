// lorakit::rowlora_ — per-row LoRA read from each adapter's own factors (see rowlora.py).
//
//   y[i, t] += scale[s] * B[s] @ (A[s] @ x[i, t])     s = slots[i]; rows with s = -1 are left as they are
//
// x (R, T, k) and y (R, T, d) may have any strides but the last (1); A[s] (r_s, k) and B[s] (d, r_s)
// are contiguous (PEFT's layout), any floating dtype each. Work items are the tokens of the rows that
// have an adapter, ordered by slot, split over ATen's threads: a thread reads a slot's factors once for
// its run of tokens with that slot (bf16 factors converted to float in registers as they are read, other
// dtypes that differ from the accumulator's converted into a scratch copy first). Products are
// accumulated in float (double if any operand is double) and added into y, rounded once. Nothing the
// size of the batch's factors is allocated.
//
// lorakit::rowlora_lookup_ — the same for embeddings: x are token ids (R, T) and A[s] is (r_s, num),
// so A[s] @ one-hot(id) is A[s]'s column id:   y[i, t] += scale[s] * B[s] @ A[s][:, ids[i, t]]
//
// Both are registered with torch.library (torch.ops.lorakit.*) and, unless built with
// LORAKIT_NO_BINDING, also bound to Python as module _rowlora's rows_(..., lookup): the same checks and
// loops without the dispatcher's boxing of the factor lists (~0.1 instead of ~0.4 µs per factor) and
// with the GIL released.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#ifndef LORAKIT_NO_BINDING
#include <torch/extension.h>
#endif

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using c10::ScalarType;

template <typename acc_t, typename src_t>
void convert(const void* src, acc_t* dst, int64_t n, int64_t stride) {
  const src_t* s = static_cast<const src_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(s[i * stride]);
}

// dst[i] = src[i * stride] in acc_t, from any floating dtype.
template <typename acc_t>
void load(const void* src, ScalarType st, acc_t* dst, int64_t n, int64_t stride = 1) {
  switch (st) {
    case ScalarType::Float: return convert<acc_t, float>(src, dst, n, stride);
    case ScalarType::Double: return convert<acc_t, double>(src, dst, n, stride);
    case ScalarType::BFloat16: return convert<acc_t, c10::BFloat16>(src, dst, n, stride);
    case ScalarType::Half: return convert<acc_t, c10::Half>(src, dst, n, stride);
    default: TORCH_CHECK(false, "lorakit::rowlora_: unsupported dtype ", st);
  }
}

template <typename acc_t, typename dst_t>
void add_to(void* dst, const acc_t* add, int64_t n) {
  dst_t* d = static_cast<dst_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<dst_t>(static_cast<acc_t>(d[i]) + add[i]);
}

// dst[i] += add[i], computed in acc_t and rounded once to dst's dtype.
template <typename acc_t>
void add_into(void* dst, ScalarType st, const acc_t* add, int64_t n) {
  switch (st) {
    case ScalarType::Float: return add_to<acc_t, float>(dst, add, n);
    case ScalarType::Double: return add_to<acc_t, double>(dst, add, n);
    case ScalarType::BFloat16: return add_to<acc_t, c10::BFloat16>(dst, add, n);
    case ScalarType::Half: return add_to<acc_t, c10::Half>(dst, add, n);
    default: TORCH_CHECK(false, "lorakit::rowlora_: unsupported dtype ", st);
  }
}

// Sixteen independent partial sums: the compiler vectorises them without reassociating one sum. a may
// be stored in a narrower type S (bf16), converted in registers.
template <typename acc_t, typename S>
inline acc_t dot(const S* a, const acc_t* b, int64_t n) {
  constexpr int L = 16;
  acc_t part[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) part[l] += static_cast<acc_t>(a[i + l]) * b[i + l];
  acc_t total = 0;
  for (; i < n; ++i) total += static_cast<acc_t>(a[i]) * b[i];
  for (int l = 0; l < L; ++l) total += part[l];
  return total;
}

// out[o] (+)= B[o, :R]·h for B (d, R) row-major (Add: += into out, else =). With R known at compile time
// the inner sum unrolls and the loop over o vectorises (strided loads); each o keeps its own order of
// additions.
template <typename acc_t, int R, bool Add, typename S>
void expand_fixed(const S* B, const acc_t* h, acc_t* out, int64_t d) {
  acc_t hv[R];
  for (int j = 0; j < R; ++j) hv[j] = h[j];
  for (int64_t o = 0; o < d; ++o) {
    acc_t acc = 0;
    for (int j = 0; j < R; ++j) acc += static_cast<acc_t>(B[o * R + j]) * hv[j];
    out[o] = Add ? out[o] + acc : acc;
  }
}

template <typename acc_t, bool Add, typename S>
void expand(const S* B, const acc_t* h, acc_t* out, int64_t d, int64_t r) {
  switch (r) {
    case 1: return expand_fixed<acc_t, 1, Add, S>(B, h, out, d);
    case 2: return expand_fixed<acc_t, 2, Add, S>(B, h, out, d);
    case 4: return expand_fixed<acc_t, 4, Add, S>(B, h, out, d);
    case 8: return expand_fixed<acc_t, 8, Add, S>(B, h, out, d);
    case 16: return expand_fixed<acc_t, 16, Add, S>(B, h, out, d);
    case 32: return expand_fixed<acc_t, 32, Add, S>(B, h, out, d);
    default:
      for (int64_t o = 0; o < d; ++o) out[o] = Add ? out[o] + dot<acc_t, S>(B + o * r, h, r) : dot<acc_t, S>(B + o * r, h, r);
  }
}

inline const char* at_bytes(const Tensor& t, int64_t offset) {
  return static_cast<const char*>(t.const_data_ptr()) + offset * t.element_size();
}

// x[offset] of an integer tensor (token ids).
inline int64_t id_at(const Tensor& x, int64_t offset) {
  return x.scalar_type() == ScalarType::Long ? x.const_data_ptr<int64_t>()[offset]
                                             : static_cast<int64_t>(x.const_data_ptr<int32_t>()[offset]);
}

// An adapter as the loops read it.
struct Factors {
  const void* a;
  const void* b;
  ScalarType a_type, b_type;
  int64_t r, columns;  // A is (r, columns)
  double scale;
};

// Scratch of one thread, allocated once per call (uninitialised: every use writes before it reads).
template <typename acc_t>
struct Scratch {
  std::unique_ptr<acc_t[]> x, a, b, h, sum;
  Scratch(int64_t k, int64_t d, int64_t r_max, bool convert_x, bool convert_a, bool convert_b, bool convert_y)
      : x(convert_x ? new acc_t[k] : nullptr),
        a(convert_a ? new acc_t[r_max * k] : nullptr),
        b(convert_b ? new acc_t[r_max * d] : nullptr),
        h(new acc_t[r_max]),
        sum(convert_y ? new acc_t[d] : nullptr) {}
};

// lookup: x holds ids (R, T) and A[s] is (r, num): h = A[s][:, id], read element by element (no copy of A).
template <typename acc_t>
void run(Tensor& y, const Tensor& x, const std::vector<Factors>& f, const std::vector<int64_t>& slot,
         const std::vector<int64_t>& order, bool lookup) {
  const int64_t T = x.size(1), k = lookup ? 1 : x.size(2), d = y.size(2);
  const int64_t items = static_cast<int64_t>(order.size()) * T;
  const ScalarType xt = x.scalar_type(), yt = y.scalar_type();
  const ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  // bf16 factors with a float accumulator are read as stored (converted in registers); others of another
  // dtype than the accumulator's are converted into a scratch copy per run
  auto in_registers = [&](const Factors& e) {
    return std::is_same_v<acc_t, float> && e.a_type == ScalarType::BFloat16 && e.b_type == ScalarType::BFloat16;
  };
  int64_t r_max = 1;
  bool convert_a = false, convert_b = false;
  for (const auto& e : f) {
    r_max = std::max(r_max, e.r);
    convert_a = convert_a || (!lookup && e.a_type != acc && !in_registers(e));
    convert_b = convert_b || (e.b_type != acc && !in_registers(e));
  }
  const bool convert_x = !lookup && xt != acc, convert_y = yt != acc;
  char* const ybase = static_cast<char*>(y.data_ptr());
  const char* const xbase = static_cast<const char*>(x.const_data_ptr());
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), ys0 = y.stride(0), ys1 = y.stride(1);
  const int64_t xsize = x.element_size(), ysize = y.element_size();
  // below ~64k multiply-adds a work range runs on one thread
  const int64_t grain = std::max<int64_t>(1, 65536 / (r_max * (k + d)));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> mem(k, d, r_max, convert_x, convert_a, convert_b, convert_y);
    int64_t w = begin;
    while (w < end) {  // one run: consecutive items with the same slot
      const int64_t s = slot[order[w / T]];
      int64_t stop = w + 1;
      while (stop < end && slot[order[stop / T]] == s) ++stop;
      const Factors& e = f[s];
      const int64_t r = e.r;
      const acc_t sc = static_cast<acc_t>(e.scale);
      auto items_of_run = [&](auto A, auto B) {  // A, B: the factors as stored (acc_t, or bf16 read as float)
        acc_t* const h = mem.h.get();
        for (; w < stop; ++w) {
          const int64_t xoff = order[w / T] * xs0 + (w % T) * xs1;
          if (lookup) {  // h = s·A[:, id]
            const int64_t id = id_at(x, xoff);
            TORCH_CHECK(id >= 0 && id < e.columns, "lorakit::rowlora_lookup_: id ", id, " is outside [0, ",
                        e.columns, ")");
            load(static_cast<const char*>(e.a) + id * c10::elementSize(e.a_type), e.a_type, h, r, e.columns);
            for (int64_t j = 0; j < r; ++j) h[j] *= sc;
          } else {  // h = s·A·x
            const acc_t* xv = reinterpret_cast<const acc_t*>(xbase + xoff * xsize);
            if (convert_x) load(xbase + xoff * xsize, xt, mem.x.get(), k), xv = mem.x.get();
            for (int64_t j = 0; j < r; ++j) h[j] = sc * dot(A + j * k, xv, k);
          }
          char* const yrow = ybase + (order[w / T] * ys0 + (w % T) * ys1) * ysize;
          if (convert_y) {  // y += B·h, rounded once to y's dtype
            expand<acc_t, false>(B, h, mem.sum.get(), d, r);
            add_into(yrow, yt, mem.sum.get(), d);
          } else {
            expand<acc_t, true>(B, h, reinterpret_cast<acc_t*>(yrow), d, r);
          }
        }
      };
      if (in_registers(e)) {
        items_of_run(static_cast<const c10::BFloat16*>(e.a), static_cast<const c10::BFloat16*>(e.b));
      } else {
        const acc_t* A = static_cast<const acc_t*>(e.a);
        const acc_t* B = static_cast<const acc_t*>(e.b);
        if (!lookup && e.a_type != acc) load(e.a, e.a_type, mem.a.get(), r * k), A = mem.a.get();
        if (e.b_type != acc) load(e.b, e.b_type, mem.b.get(), d * r), B = mem.b.get();
        items_of_run(A, B);
      }
    }
  });
}

bool floating(const Tensor& t) {
  const auto st = t.scalar_type();
  return st == ScalarType::Float || st == ScalarType::Double || st == ScalarType::BFloat16 || st == ScalarType::Half;
}

// The checks and the dispatch shared by both ops; lookup: x are ids and A[s] is (r_s, num).
void rows_(Tensor& y, const Tensor& x, at::ArrayRef<Tensor> a, at::ArrayRef<Tensor> b, at::ArrayRef<double> scale,
           const Tensor& slots, bool lookup) {
  const char* op = lookup ? "lorakit::rowlora_lookup_: " : "lorakit::rowlora_: ";
  const int64_t n = static_cast<int64_t>(a.size());
  if (lookup) {
    TORCH_CHECK(x.dim() == 2 && y.dim() == 3, op, "ids must be (rows, tokens) and y (rows, tokens, features)");
    TORCH_CHECK(x.scalar_type() == ScalarType::Long || x.scalar_type() == ScalarType::Int, op,
                "ids must be int64 or int32");
    TORCH_CHECK(floating(y) && y.stride(2) == 1, op, "y must be floating point with a unit last stride");
  } else {
    TORCH_CHECK(x.dim() == 3 && y.dim() == 3, op, "x and y must be (rows, tokens, features)");
    TORCH_CHECK(x.stride(2) == 1 && y.stride(2) == 1, op, "x and y need a unit last stride");
    TORCH_CHECK(floating(x) && floating(y), op, "x and y must be floating point");
  }
  TORCH_CHECK(x.size(0) == y.size(0) && x.size(1) == y.size(1), op, "x ", x.sizes(), " and y ", y.sizes(),
              " differ in rows or tokens");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && slots.device().is_cpu(), op, "CPU only");
  TORCH_CHECK(!x.is_neg() && !y.is_neg(), op, "x and y must not be lazily negated views (call resolve_neg())");
  TORCH_CHECK(static_cast<int64_t>(b.size()) == n && static_cast<int64_t>(scale.size()) == n, op,
              "a, b and scale must have one entry per adapter");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == x.size(0) && slots.scalar_type() == ScalarType::Long, op,
              "slots must be int64, one per row");
  bool wide = (!lookup && x.scalar_type() == ScalarType::Double) || y.scalar_type() == ScalarType::Double;
  std::vector<Factors> f;
  f.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(a[i].dim() == 2 && b[i].dim() == 2 && (lookup || a[i].size(1) == x.size(2)) &&
                    b[i].size(0) == y.size(2) && b[i].size(1) == a[i].size(0),
                op, "adapter ", i, ": A ", a[i].sizes(), " and B ", b[i].sizes(), " do not fit x ", x.sizes(),
                " and y ", y.sizes());
    TORCH_CHECK(a[i].is_contiguous() && b[i].is_contiguous() && floating(a[i]) && floating(b[i]) &&
                    a[i].device().is_cpu() && b[i].device().is_cpu() && !a[i].is_neg() && !b[i].is_neg(),
                op, "adapter ", i, ": factors must be contiguous floating CPU tensors (not lazily negated views)");
    wide = wide || a[i].scalar_type() == ScalarType::Double || b[i].scalar_type() == ScalarType::Double;
    f.push_back({a[i].const_data_ptr(), b[i].const_data_ptr(), a[i].scalar_type(), b[i].scalar_type(),
                 a[i].size(0), a[i].size(1), scale[i]});
  }
  const Tensor s = slots.contiguous();
  std::vector<int64_t> slot(s.const_data_ptr<int64_t>(), s.const_data_ptr<int64_t>() + s.numel());
  std::vector<int64_t> order;
  order.reserve(slot.size());
  for (int64_t i = 0; i < static_cast<int64_t>(slot.size()); ++i) {
    TORCH_CHECK(slot[i] >= -1 && slot[i] < n, op, "slot ", slot[i], " of row ", i, " is outside [-1, ", n, ")");
    if (slot[i] >= 0) order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return slot[p] < slot[q]; });
  // An in-place update, as autograd must see it: a backward that saved y then refuses to run (and an
  // inference tensor refuses the update outside inference mode), as for torch's own in-place ops.
  y.unsafeGetTensorImpl()->bump_version();
  if (order.empty() || x.size(1) == 0) return;
  if (wide)
    run<double>(y, x, f, slot, order, lookup);
  else
    run<float>(y, x, f, slot, order, lookup);
}

void rowlora_(Tensor y, const Tensor& x, at::TensorList a, at::TensorList b, at::ArrayRef<double> scale,
              const Tensor& slots) {
  rows_(y, x, a, b, scale, slots, false);
}

void rowlora_lookup_(Tensor y, const Tensor& ids, at::TensorList a, at::TensorList b, at::ArrayRef<double> scale,
                     const Tensor& slots) {
  rows_(y, ids, a, b, scale, slots, true);
}

#ifndef LORAKIT_NO_BINDING
// The Python binding's entry: the same checks and loops, called without the dispatcher and the GIL. Its
// errors are RuntimeErrors with the message alone, as the op's.
void rows_direct(Tensor y, const Tensor& x, const std::vector<Tensor>& a, const std::vector<Tensor>& b,
                 const std::vector<double>& scale, const Tensor& slots, bool lookup) {
  pybind11::gil_scoped_release unlocked;
  try {
    rows_(y, x, a, b, scale, slots, lookup);
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}
#endif

}  // namespace

TORCH_LIBRARY(lorakit, m) {
  m.def("rowlora_(Tensor(a!) y, Tensor x, Tensor[] a, Tensor[] b, float[] scale, Tensor slots) -> ()");
  m.def("rowlora_lookup_(Tensor(a!) y, Tensor ids, Tensor[] a, Tensor[] b, float[] scale, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("rowlora_", &rowlora_);
  m.impl("rowlora_lookup_", &rowlora_lookup_);
}

#ifndef LORAKIT_NO_BINDING
PYBIND11_MODULE(_rowlora, m) {
  m.def("rows_", &rows_direct, "rowlora_ (lookup=False) or rowlora_lookup_ (True), without the dispatcher");
}
#endif

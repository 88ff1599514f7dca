// lorakit::rowlora_ — per-row LoRA read from each adapter's own factors (see rowlora.py).
//
//   y[i, t] += scale[s] * B[s] @ (A[s] @ x[i, t])     s = slots[i]; rows with s = -1 are left as they are
//
// x (R, T, k) and y (R, T, d) may have any strides but the last (1); A[s] (r_s, k) and B[s] (d, r_s)
// are contiguous (PEFT's layout), any floating dtype each. Work items are the tokens of the rows that
// have an adapter, ordered by slot, split over ATen's threads: a thread reads a slot's factors once
// for its run of tokens with that slot. Products are accumulated in float (double if any operand is
// double) and added into y, rounded once. Nothing the size of the batch's factors is allocated.
//
// lorakit::rowlora_lookup_ — the same for embeddings: x are token ids (R, T) and A[s] is (r_s, num),
// so A[s] @ one-hot(id) is A[s]'s column id:   y[i, t] += scale[s] * B[s] @ A[s][:, ids[i, t]]
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
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

// Sixteen independent partial sums: the compiler vectorises them without reassociating one sum.
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  constexpr int L = 16;
  acc_t part[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) part[l] += a[i + l] * b[i + l];
  acc_t total = 0;
  for (; i < n; ++i) total += a[i] * b[i];
  for (int l = 0; l < L; ++l) total += part[l];
  return total;
}

// sum[o] = B[o, :r] · h for B (d, r) row-major. With r known at compile time the inner sum unrolls
// and the loop over o vectorises (strided loads); each o keeps its own order of additions.
template <typename acc_t, int R>
void expand_fixed(const acc_t* B, const acc_t* h, acc_t* sum, int64_t d) {
  acc_t hv[R];
  for (int j = 0; j < R; ++j) hv[j] = h[j];
  for (int64_t o = 0; o < d; ++o) {
    acc_t acc = 0;
    for (int j = 0; j < R; ++j) acc += B[o * R + j] * hv[j];
    sum[o] = acc;
  }
}

template <typename acc_t>
void expand(const acc_t* B, const acc_t* h, acc_t* sum, int64_t d, int64_t r) {
  switch (r) {
    case 1: return expand_fixed<acc_t, 1>(B, h, sum, d);
    case 2: return expand_fixed<acc_t, 2>(B, h, sum, d);
    case 4: return expand_fixed<acc_t, 4>(B, h, sum, d);
    case 8: return expand_fixed<acc_t, 8>(B, h, sum, d);
    case 16: return expand_fixed<acc_t, 16>(B, h, sum, d);
    case 32: return expand_fixed<acc_t, 32>(B, h, sum, d);
    default:
      for (int64_t o = 0; o < d; ++o) sum[o] = dot(B + o * r, h, r);
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

// lookup: x holds ids (R, T) and A[s] is (r, num): h = A[s][:, id], read element by element (no copy of A).
template <typename acc_t>
void run(Tensor& y, const Tensor& x, const std::vector<Tensor>& a, const std::vector<Tensor>& b,
         const std::vector<double>& scale, const std::vector<int64_t>& slot, const std::vector<int64_t>& order,
         bool lookup) {
  const int64_t T = x.size(1), k = lookup ? 1 : x.size(2), d = y.size(2);
  const int64_t items = static_cast<int64_t>(order.size()) * T;
  int64_t r_max = 1;
  for (const auto& f : a) r_max = std::max(r_max, f.size(0));
  const ScalarType xt = x.scalar_type(), yt = y.scalar_type();
  const ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  char* ybase = static_cast<char*>(y.data_ptr());
  // below ~64k multiply-adds a work range runs on one thread
  const int64_t grain = std::max<int64_t>(1, 65536 / (r_max * (k + d)));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(k), abuf(r_max * k), bbuf(r_max * d), h(r_max), sum(d);
    int64_t current = -1, r = 0;
    const acc_t* A = nullptr;
    const acc_t* B = nullptr;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t row = order[w / T], t = w % T, s = slot[row];
      if (s != current) {  // this thread's run of tokens with slot s starts: its factors as acc_t
        r = a[s].size(0);
        if (lookup) {
          A = nullptr;  // read per token
        } else if (a[s].scalar_type() == acc) {
          A = static_cast<const acc_t*>(a[s].const_data_ptr());
        } else {
          load(a[s].const_data_ptr(), a[s].scalar_type(), abuf.data(), r * k);
          A = abuf.data();
        }
        if (b[s].scalar_type() == acc) {
          B = static_cast<const acc_t*>(b[s].const_data_ptr());
        } else {
          load(b[s].const_data_ptr(), b[s].scalar_type(), bbuf.data(), d * r);
          B = bbuf.data();
        }
        current = s;
      }
      const int64_t xoff = row * x.stride(0) + t * x.stride(1);
      const acc_t sc = static_cast<acc_t>(scale[s]);
      if (lookup) {
        const int64_t id = id_at(x, xoff), num = a[s].size(1);
        TORCH_CHECK(id >= 0 && id < num, "lorakit::rowlora_lookup_: id ", id, " is outside [0, ", num, ")");
        load(at_bytes(a[s], id), a[s].scalar_type(), h.data(), r, num);
        for (int64_t j = 0; j < r; ++j) h[j] *= sc;
        expand(B, h.data(), sum.data(), d, r);
        add_into(ybase + (row * y.stride(0) + t * y.stride(1)) * y.element_size(), yt, sum.data(), d);
        continue;
      }
      const acc_t* xv;
      if (xt == acc) {
        xv = static_cast<const acc_t*>(x.const_data_ptr()) + xoff;
      } else {
        load(at_bytes(x, xoff), xt, xbuf.data(), k);
        xv = xbuf.data();
      }
      for (int64_t j = 0; j < r; ++j) h[j] = sc * dot(A + j * k, xv, k);
      expand(B, h.data(), sum.data(), d, r);
      add_into(ybase + (row * y.stride(0) + t * y.stride(1)) * y.element_size(), yt, sum.data(), d);
    }
  });
}

bool floating(const Tensor& t) {
  const auto st = t.scalar_type();
  return st == ScalarType::Float || st == ScalarType::Double || st == ScalarType::BFloat16 || st == ScalarType::Half;
}

// The checks and the dispatch shared by both ops; lookup: x are ids and A[s] is (r_s, num).
void rows_(Tensor& y, const Tensor& x, at::TensorList a, at::TensorList b, at::ArrayRef<double> scale,
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
  TORCH_CHECK(static_cast<int64_t>(b.size()) == n && static_cast<int64_t>(scale.size()) == n, op,
              "a, b and scale must have one entry per adapter");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == x.size(0) && slots.scalar_type() == ScalarType::Long, op,
              "slots must be int64, one per row");
  bool wide = (!lookup && x.scalar_type() == ScalarType::Double) || y.scalar_type() == ScalarType::Double;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(a[i].dim() == 2 && b[i].dim() == 2 && (lookup || a[i].size(1) == x.size(2)) &&
                    b[i].size(0) == y.size(2) && b[i].size(1) == a[i].size(0),
                op, "adapter ", i, ": A ", a[i].sizes(), " and B ", b[i].sizes(), " do not fit x ", x.sizes(),
                " and y ", y.sizes());
    TORCH_CHECK(a[i].is_contiguous() && b[i].is_contiguous() && floating(a[i]) && floating(b[i]) &&
                    a[i].device().is_cpu() && b[i].device().is_cpu(),
                op, "adapter ", i, ": factors must be contiguous floating CPU tensors");
    wide = wide || a[i].scalar_type() == ScalarType::Double || b[i].scalar_type() == ScalarType::Double;
  }
  const Tensor s = slots.contiguous();
  std::vector<int64_t> slot(s.const_data_ptr<int64_t>(), s.const_data_ptr<int64_t>() + s.numel());
  std::vector<int64_t> order;
  for (int64_t i = 0; i < static_cast<int64_t>(slot.size()); ++i) {
    TORCH_CHECK(slot[i] >= -1 && slot[i] < n, op, "slot ", slot[i], " of row ", i, " is outside [-1, ", n, ")");
    if (slot[i] >= 0) order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return slot[p] < slot[q]; });
  if (order.empty() || x.size(1) == 0) return;
  const std::vector<Tensor> av(a.begin(), a.end()), bv(b.begin(), b.end());
  const std::vector<double> sv(scale.begin(), scale.end());
  if (wide)
    run<double>(y, x, av, bv, sv, slot, order, lookup);
  else
    run<float>(y, x, av, bv, sv, slot, order, lookup);
}

void rowlora_(Tensor y, const Tensor& x, at::TensorList a, at::TensorList b, at::ArrayRef<double> scale,
              const Tensor& slots) {
  rows_(y, x, a, b, scale, slots, false);
}

void rowlora_lookup_(Tensor y, const Tensor& ids, at::TensorList a, at::TensorList b, at::ArrayRef<double> scale,
                     const Tensor& slots) {
  rows_(y, ids, a, b, scale, slots, true);
}

}  // namespace

TORCH_LIBRARY(lorakit, m) {
  m.def("rowlora_(Tensor(a!) y, Tensor x, Tensor[] a, Tensor[] b, float[] scale, Tensor slots) -> ()");
  m.def("rowlora_lookup_(Tensor(a!) y, Tensor ids, Tensor[] a, Tensor[] b, float[] scale, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("rowlora_", &rowlora_);
  m.impl("rowlora_lookup_", &rowlora_lookup_);
}

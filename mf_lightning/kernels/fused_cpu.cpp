// One Memory Layer for a few tokens on the CPU, without gradients: hash, score, gather and sum in one loop.
//
// Decoding one token reads K rows of a layer's tables; a chain of framework operators for it (hash,
// scores, offsets, embedding_bag) costs more in calls than the bytes take to read. This operator does
// the whole layer in one call: per token it hashes every chunk, computes its score, then adds the
// selected rows, each read front to back and scaled by its score, into a float32 accumulator. Same contract
// and rounding as the Python backends (mf_lightning/kernels/reference.py): the score is rounded to
// the tables' dtype before it scales the row, the sum is kept in float32 and rounded once.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

template <typename T>
inline float to_float(T value) {
  return static_cast<float>(value);
}

// e**u for u <= 0 (clamped below at -87, where it is ~1e-38) to within a few float ulps: Cody-Waite range
// reduction and a degree-6 polynomial, branch-free so that the compiler vectorises the loop calling it.
inline float exp_nonpositive(float u) {
  u = u < -87.0f ? -87.0f : u;
  const float n = std::nearbyint(u * 1.44269504088896341f);
  const float r = (u - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Adds the score-weighted sum of G rows into acc: the loop that reads the bytes, which the compiler
// vectorises. Rows are scattered across the tables, so the hardware prefetcher cannot run ahead from one
// to the next; streaming G of them at once keeps more reads in flight (and acc is loaded and stored once
// per G rows). G = 8 measured fastest; software prefetching of the next rows measured slower.
constexpr int kRowsAtOnce = 8;

template <typename T, int G>
inline void add_scaled_rows(float* __restrict acc, const T* const* rows, const float* scores, int64_t width) {
  const T* r[G];
  float s[G];
  for (int i = 0; i < G; ++i) {
    r[i] = rows[i];
    s[i] = scores[i];
  }
  for (int64_t j = 0; j < width; ++j) {
    float sum = acc[j];
    for (int i = 0; i < G; ++i) {
      sum += s[i] * to_float(r[i][j]);
    }
    acc[j] = sum;
  }
}

template <typename T>
void memory_layer_tokens(
    const T* x, const T* tables, const T* bias, T* y, int64_t* buckets, int64_t tokens, int64_t num_tables,
    int64_t code_bits, int64_t width, bool scaled, float temperature) {
  const int64_t rows_per_table = int64_t{1} << code_bits;
  const int64_t in_features = num_tables * code_bits;
  const float steepness = 2.0f / temperature;
  std::vector<float> acc(width);
  std::vector<float> scores(num_tables);
  std::vector<float> values(in_features);
  std::vector<float> factors(in_features);
  std::vector<const T*> rows(num_tables);
  for (int64_t n = 0; n < tokens; ++n) {
    const T* token = x + n * in_features;
    for (int64_t i = 0; i < in_features; ++i) {
      values[i] = to_float(token[i]);
      factors[i] = 1.0f + exp_nonpositive(-steepness * std::fabs(values[i]));
    }
    int64_t* token_buckets = buckets + n * num_tables;
    for (int64_t k = 0; k < num_tables; ++k) {
      int64_t bucket = 0;
      float magnitude = 0.0f;
      float denominator = 1.0f;
      for (int64_t j = k * code_bits; j < (k + 1) * code_bits; ++j) {
        bucket = (bucket << 1) | (values[j] >= 0.0f ? 1 : 0);
        magnitude += std::fabs(values[j]);
        denominator *= factors[j];
      }
      const float probability = 1.0f / denominator;
      token_buckets[k] = bucket;
      scores[k] = to_float(static_cast<T>(scaled ? magnitude * probability : probability));
      rows[k] = tables + (k * rows_per_table + bucket) * width;
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    int64_t k = 0;
    for (; k + kRowsAtOnce <= num_tables; k += kRowsAtOnce) {
      add_scaled_rows<T, kRowsAtOnce>(acc.data(), rows.data() + k, scores.data() + k, width);
    }
    for (; k < num_tables; ++k) {
      add_scaled_rows<T, 1>(acc.data(), rows.data() + k, scores.data() + k, width);
    }
    T* out = y + n * width;
    for (int64_t j = 0; j < width; ++j) {
      out[j] = static_cast<T>(bias ? to_float(static_cast<T>(acc[j])) + to_float(bias[j]) : acc[j]);
    }
  }
}

// x [N, K * code_bits], tables [K, 2**code_bits, D], bias [D] or none, all contiguous, one dtype
// (float32 or bfloat16), checked by the Python caller -> (y [N, D], buckets int64 [N, K]).
std::tuple<at::Tensor, at::Tensor> memory_layer_inference(
    const at::Tensor& x, const at::Tensor& tables, const std::optional<at::Tensor>& bias, bool scaled,
    double temperature) {
  const int64_t tokens = x.size(0);
  const int64_t num_tables = tables.size(0);
  const int64_t code_bits = __builtin_ctzll(static_cast<uint64_t>(tables.size(1)));
  const int64_t width = tables.size(2);
  at::Tensor y = at::empty({tokens, width}, tables.options());
  at::Tensor buckets = at::empty({tokens, num_tables}, tables.options().dtype(at::kLong));
  const bool has_bias = bias.has_value() && bias->defined();
  if (tables.scalar_type() == at::kBFloat16) {
    using T = c10::BFloat16;
    memory_layer_tokens<T>(
        x.const_data_ptr<T>(), tables.const_data_ptr<T>(), has_bias ? bias->const_data_ptr<T>() : nullptr,
        y.mutable_data_ptr<T>(), buckets.mutable_data_ptr<int64_t>(), tokens, num_tables, code_bits, width,
        scaled, static_cast<float>(temperature));
  } else {
    memory_layer_tokens<float>(
        x.const_data_ptr<float>(), tables.const_data_ptr<float>(),
        has_bias ? bias->const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(),
        buckets.mutable_data_ptr<int64_t>(), tokens, num_tables, code_bits, width, scaled,
        static_cast<float>(temperature));
  }
  return {y, buckets};
}

}  // namespace

TORCH_LIBRARY(mf_lightning, m) {
  m.def("memory_layer_inference(Tensor x, Tensor tables, Tensor? bias, bool scaled, float temperature) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mf_lightning, CPU, m) {
  m.impl("memory_layer_inference", &memory_layer_inference);
}

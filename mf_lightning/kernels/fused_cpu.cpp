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

// Attention of one query per head over the first `visible` slots of a KV cache, in float32: scores,
// softmax (the exponentials in one vectorised loop) and the weighted sum of values, four slots at a time.
template <typename T>
void attend_one_query(
    const T* q, const T* keys, const T* values, T* out, int64_t heads, int64_t slots, int64_t head_size,
    int64_t visible) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_size));
  std::vector<float> query(head_size);
  std::vector<float> weights(visible);
  std::vector<float> acc(head_size);
  const T* slot_rows[kRowsAtOnce];
  for (int64_t h = 0; h < heads; ++h) {
    const T* k = keys + h * slots * head_size;
    const T* v = values + h * slots * head_size;
    for (int64_t j = 0; j < head_size; ++j) {
      query[j] = to_float(q[h * head_size + j]) * scale;
    }
    float largest = -INFINITY;
    for (int64_t t = 0; t < visible; ++t) {
      const T* key = k + t * head_size;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < head_size; ++j) {
        dot += query[j] * to_float(key[j]);
      }
      weights[t] = dot;
      largest = std::max(largest, dot);
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < visible; ++t) {
      weights[t] = exp_nonpositive(weights[t] - largest);
      total += weights[t];
    }
    const float inverse_total = 1.0f / total;
    for (int64_t t = 0; t < visible; ++t) {
      weights[t] *= inverse_total;
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    int64_t t = 0;
    for (; t + kRowsAtOnce <= visible; t += kRowsAtOnce) {
      for (int i = 0; i < kRowsAtOnce; ++i) {
        slot_rows[i] = v + (t + i) * head_size;
      }
      add_scaled_rows<T, kRowsAtOnce>(acc.data(), slot_rows, weights.data() + t, head_size);
    }
    for (; t < visible; ++t) {
      slot_rows[0] = v + t * head_size;
      add_scaled_rows<T, 1>(acc.data(), slot_rows, weights.data() + t, head_size);
    }
    for (int64_t j = 0; j < head_size; ++j) {
      out[h * head_size + j] = static_cast<T>(acc[j]);
    }
  }
}

// q [B, H, 1, S], keys and values [B, H, L, S] (a static KV cache's storage), contiguous, one dtype (float32
// or bfloat16), position int64 [1]: the query of the token at slot `position` attends to slots
// 0..position -> softmax(q k / sqrt(S)) v, [B, H, 1, S].
at::Tensor attention_inference(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& position) {
  const int64_t batch = q.size(0), heads = q.size(1), head_size = q.size(3), slots = keys.size(2);
  const int64_t visible = std::min(position.item<int64_t>() + 1, slots);
  at::Tensor out = at::empty({batch, heads, 1, head_size}, q.options());
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t query = b * heads * head_size, cached = b * heads * slots * head_size;
    if (q.scalar_type() == at::kBFloat16) {
      using T = c10::BFloat16;
      attend_one_query<T>(
          q.const_data_ptr<T>() + query, keys.const_data_ptr<T>() + cached, values.const_data_ptr<T>() + cached,
          out.mutable_data_ptr<T>() + query, heads, slots, head_size, visible);
    } else {
      attend_one_query<float>(
          q.const_data_ptr<float>() + query, keys.const_data_ptr<float>() + cached,
          values.const_data_ptr<float>() + cached, out.mutable_data_ptr<float>() + query, heads, slots, head_size,
          visible);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(mf_lightning, m) {
  m.def("memory_layer_inference(Tensor x, Tensor tables, Tensor? bias, bool scaled, float temperature) -> (Tensor, Tensor)");
  m.def("attention_inference(Tensor q, Tensor keys, Tensor values, Tensor position) -> Tensor");
}

TORCH_LIBRARY_IMPL(mf_lightning, CPU, m) {
  m.impl("memory_layer_inference", &memory_layer_inference);
  m.impl("attention_inference", &attention_inference);
}

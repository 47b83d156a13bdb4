#include "onednn_weight.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <map>
#include <mutex>

namespace at::native {
// Defined in ATen/native/mkldnn/MKLDNNCommon.cpp, declared (TORCH_API) in MKLDNNCommon.h, which
// includes ideep, a header torch does not ship. Weak: a torch without them still loads this
// extension and lut_conv2d takes its plain path.
__attribute__((weak, visibility("default"))) void* data_ptr_from_mkldnn(const at::Tensor& mkldnn_tensor);
__attribute__((weak, visibility("default"))) at::Tensor mkldnn_tensor_from_data_ptr(
    void* data_ptr, at::IntArrayRef dims, at::ScalarType dtype, at::Device device, const uint8_t* opaque_metadata,
    int64_t opaque_metadata_size);
}  // namespace at::native

namespace mixedprec {
namespace {

using ConvPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                                 c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

struct OneDnn {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)> serialized_descriptor;
  c10::TypedOperatorHandle<int64_t(const at::Tensor&)> nbytes;
  c10::TypedOperatorHandle<ConvPointwise> conv;
};

// The ops this path needs, or nullptr where this torch lacks any of them.
const OneDnn* onednn() {
  static const std::optional<OneDnn> ops = []() -> std::optional<OneDnn> {
    if (!at::hasMKLDNN() || !at::native::data_ptr_from_mkldnn || !at::native::mkldnn_tensor_from_data_ptr)
      return std::nullopt;
    auto& dispatcher = c10::Dispatcher::singleton();
    const auto md = dispatcher.findSchema({"mkldnn::_get_mkldnn_serialized_md", ""});
    const auto nbytes = dispatcher.findSchema({"mkldnn::_nbytes", ""});
    const auto conv = dispatcher.findSchema({"mkldnn::_convolution_pointwise", ""});
    if (!md || !nbytes || !conv) return std::nullopt;
    try {  // typed() checks the C++ signature against the registered schema
      return OneDnn{md->typed<at::Tensor(const at::Tensor&)>(), nbytes->typed<int64_t(const at::Tensor&)>(),
                    conv->typed<ConvPointwise>()};
    } catch (const c10::Error&) {
      return std::nullopt;
    }
  }();
  return ops ? &*ops : nullptr;
}

std::shared_ptr<const BlockedLayout> learn_layout(const OneDnn& dnn, at::IntArrayRef weight_shape,
                                                  at::IntArrayRef input_shape, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const int64_t O = weight_shape[0], R = weight_shape[1] * weight_shape[2] * weight_shape[3], n = O * R;
  if (n >= (int64_t(1) << 24)) return nullptr;
  const at::Tensor index = at::arange(1, n + 1, at::TensorOptions(at::kFloat)).view(weight_shape);
  // Given the input's size, ATen prepacks for the channels-last convolution.
  const at::Tensor packed =
      at::mkldnn_reorder_conv2d_weight(index.to_mkldnn(), padding, stride, dilation, groups, input_shape);
  auto layout = std::make_shared<BlockedLayout>();
  const at::Tensor md = dnn.serialized_descriptor.call(packed).contiguous();
  layout->descriptor.assign(md.data_ptr<uint8_t>(), md.data_ptr<uint8_t>() + md.numel());
  layout->floats = dnn.nbytes.call(packed) / int64_t(sizeof(float));
  const float* data = static_cast<const float*>(at::native::data_ptr_from_mkldnn(packed));
  std::vector<int64_t> where(n, -1);  // position of each weight in the buffer
  for (int64_t p = 0; p < layout->floats; ++p) {
    const float v = data[p];
    if (v == 0.0f) {
      layout->padded = true;
      continue;
    }
    const int64_t i = int64_t(v) - 1;
    if (!(v >= 1.0f && i < n && float(i + 1) == v) || where[i] >= 0) return nullptr;
    where[i] = p;
  }
  layout->channel.resize(O);
  layout->tap.assign(where.begin(), where.begin() + R);
  for (int64_t o = 0; o < O; ++o) {
    layout->channel[o] = where[o * R] - where[0];
    for (int64_t k = 0; k < R; ++k)
      if (where[o * R + k] != layout->channel[o] + layout->tap[k]) return nullptr;  // also: every weight placed
  }
  layout->channels_run16.assign((O + 15) / 16, 0);
  for (int64_t j = 0; j < O / 16; ++j) {
    bool run = true;
    for (int64_t i = 1; i < 16; ++i) run = run && layout->channel[16 * j + i] == layout->channel[16 * j] + i;
    layout->channels_run16[j] = run;
  }
  return layout;
}

}  // namespace

std::shared_ptr<const BlockedLayout> blocked_layout(at::IntArrayRef weight_shape, at::IntArrayRef input_shape,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, int64_t groups) {
  const OneDnn* dnn = onednn();
  if (dnn == nullptr || !at::globalContext().userEnabledMkldnn() || input_shape[0] == 0) return nullptr;
  std::vector<int64_t> key;
  for (at::IntArrayRef part : {weight_shape, input_shape, stride, padding, dilation}) key.insert(key.end(), part.begin(), part.end());
  key.push_back(groups);
  // A model has a few geometries per input size; past kMaxCached (shapes changing every call)
  // the cache starts over rather than growing.
  constexpr size_t kMaxCached = 256;
  static std::mutex mutex;
  static std::map<std::vector<int64_t>, std::shared_ptr<const BlockedLayout>> cache;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto hit = cache.find(key);
    if (hit != cache.end()) return hit->second;
  }
  std::shared_ptr<const BlockedLayout> layout;
  try {
    layout = learn_layout(*dnn, weight_shape, input_shape, stride, padding, dilation, groups);
  } catch (const c10::Error&) {  // a geometry oneDNN does not prepack: the plain path runs it
  }
  const std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= kMaxCached) cache.clear();
  cache.emplace(std::move(key), layout);
  return layout;
}

at::Tensor blocked_conv2d(const at::Tensor& x, const at::Tensor& buffer, const BlockedLayout& layout,
                          at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(buffer.scalar_type() == at::kFloat && buffer.is_contiguous() && buffer.numel() >= layout.floats,
              "blocked_conv2d: the weight buffer must be float32, contiguous, of ", layout.floats, " floats");
  const at::Tensor weight =
      at::native::mkldnn_tensor_from_data_ptr(buffer.data_ptr(), weight_shape, at::kFloat, x.device(),
                                              layout.descriptor.data(), int64_t(layout.descriptor.size()));
  return onednn()->conv.call(x, weight, bias, padding, stride, dilation, groups, "none",
                             c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

}  // namespace mixedprec

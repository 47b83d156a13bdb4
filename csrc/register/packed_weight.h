// The packed weight's seven op arguments (codes, codebook, channel_scale, keep_bitmap,
// code_offsets, weight_shape, bits; the same order in lowbit_linear and lut_conv2d) checked and
// turned into the kernels' view (include/mixedprec/packed_weight.h).
#pragma once

#include <algorithm>
#include <cstring>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "mixedprec/packed_weight.h"
#include "register/op.h"

// The seven arguments in schema form, written once for both ops.
#define MP_PACKED_WEIGHT_ARGS \
  "Tensor codes, Tensor codebook, Tensor channel_scale, Tensor? keep_bitmap, Tensor? code_offsets, int[] weight_shape, int bits"

namespace mixedprec {

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kLong: return "int64";
    case at::kByte: return "uint8";
    default: return c10::toString(t);
  }
}

// A contiguous tensor of `dtype` and `shape` on like's device.
inline void check_tensor(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape, const at::Tensor& like,
                         const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == shape, op, ": ", name, " must be ", dtype_name(dtype),
              " of shape ", shape, ", got ", dtype_name(t.scalar_type()), " ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  check_same_device(t, like, op, name);
}

namespace detail {

// Kept weights, after checking that code_offsets[b] counts the bitmap's kept weights before block b
// for every block (so that no kernel reads past the code stream). Reads 16 bytes per 64 weights: a
// branch-free pass, then the culprit on failure.
inline int64_t count_index(const PackedView& w, const char* op) {
  const int64_t blocks = ceil_div(w.numel(), kCodeBlock), bytes = w.bitmap_bytes();
  const auto block_bits = [&](int64_t b) {  // whole blocks: one 8-byte load
    uint64_t block;
    std::memcpy(&block, w.keep_bitmap + b * (kCodeBlock / 8), sizeof block);
    return block;
  };
  uint64_t last = 0;  // the last block: its bytes, the bits past numel clear in a valid bitmap
  const int64_t last_first = (blocks - 1) * (kCodeBlock / 8);
  std::memcpy(&last, w.keep_bitmap + last_first, size_t(bytes - last_first));
  const int64_t last_bits = w.numel() - (blocks - 1) * kCodeBlock;  // 1..64
  // kernels read the last byte whole: its bits past numel must be clear
  TORCH_CHECK(last_bits == 64 || (last >> last_bits) == 0, op, ": keep_bitmap's bits past the weight's ", w.numel(),
              " entries must be 0");
  const auto count = [&](int64_t b) { return __builtin_popcountll(b + 1 < blocks ? block_bits(b) : last); };
  int64_t kept = 0;
  uint64_t bad = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    bad |= uint64_t(w.code_offsets[b] ^ kept);
    kept += count(b);
  }
  for (int64_t b = 0, before = 0; bad && b < blocks; before += count(b), ++b)
    TORCH_CHECK(w.code_offsets[b] == before, op, ": code_offsets must count keep_bitmap's kept weights before "
                "each block of ", kCodeBlock, ", but block ", b, " starts at ", w.code_offsets[b],
                " where the bitmap keeps ", before);
  return kept;
}

// count_index once per version of a (code_offsets, keep_bitmap) pair: it cost ~10% of a sparse
// 4096 x 4096 GEMV at batch 1 on every call. Entries hold weak references, which keep a freed
// tensor's TensorImpl allocated: no new tensor can take its address, so an entry matches only the
// tensors it counted. An in-place write bumps a tensor's version; `.data =` swaps its data pointer.
// Inference tensors have no version: they are counted on every call (formats.PackedWeight copies
// an inference-mode bitmap out).
struct CheckedIndex {
  c10::weak_intrusive_ptr<c10::TensorImpl> offsets, bitmap;
  int64_t offsets_version, bitmap_version;
  const void *offsets_data, *bitmap_data;
  int64_t kept;
};

inline int64_t checked_index(const at::Tensor& offsets, const at::Tensor& bitmap, const PackedView& w,
                             const char* op) {
  if (offsets.is_inference() || bitmap.is_inference()) return count_index(w, op);
  static std::mutex mutex;
  static std::unordered_map<const c10::TensorImpl*, CheckedIndex> checked;
  static size_t prune_at = 1024;
  const auto matches = [&](const CheckedIndex& e) {
    return e.bitmap._unsafe_get_target() == bitmap.unsafeGetTensorImpl() &&
           e.offsets_version == offsets._version() && e.bitmap_version == bitmap._version() &&
           e.offsets_data == w.code_offsets && e.bitmap_data == w.keep_bitmap;
  };
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = checked.find(offsets.unsafeGetTensorImpl());
    if (it != checked.end() && matches(it->second)) return it->second.kept;
  }
  const int64_t kept = count_index(w, op);  // outside the lock: other layers' calls go on
  const std::lock_guard<std::mutex> lock(mutex);
  if (checked.size() >= prune_at) {  // drop the entries of freed tensors
    for (auto it = checked.begin(); it != checked.end();) it = it->second.offsets.expired() ? checked.erase(it) : ++it;
    prune_at = std::max<size_t>(1024, 2 * checked.size());
  }
  checked.insert_or_assign(offsets.unsafeGetTensorImpl(),
                           CheckedIndex{c10::weak_intrusive_ptr<c10::TensorImpl>(offsets.getIntrusivePtr()),
                                        c10::weak_intrusive_ptr<c10::TensorImpl>(bitmap.getIntrusivePtr()),
                                        offsets._version(), bitmap._version(), w.code_offsets, w.keep_bitmap, kept});
  return kept;
}

}  // namespace detail

// `like` is the op's x or grad_y: every tensor must be on its device. Reading values would sync a
// GPU, so a sparse weight's index and code stream length are checked on CPU tensors only
// (detail::checked_index); formats.PackedWeight guarantees them anyway.
inline PackedView check_packed_weight(const at::Tensor& like, const at::Tensor& codes, const at::Tensor& codebook,
                                      const at::Tensor& channel_scale, const std::optional<at::Tensor>& keep_bitmap,
                                      const std::optional<at::Tensor>& code_offsets, at::IntArrayRef weight_shape,
                                      int64_t bits, const char* op) {
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must lie in 1..8, got ", bits);
  TORCH_CHECK(!weight_shape.empty(), op, ": weight_shape must not be empty");
  int64_t numel = 1;
  for (int64_t s : weight_shape) {
    TORCH_CHECK(s >= 1, op, ": weight_shape must be positive, got ", weight_shape);
    numel *= s;
  }
  const int64_t out = weight_shape[0];
  check_tensor(codebook, at::kFloat, {int64_t(1) << bits}, like, op, "codebook");
  check_tensor(channel_scale, at::kFloat, {out}, like, op, "channel_scale");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 1 && codes.is_contiguous(), op,
              ": codes must be a contiguous 1-D uint8 tensor, got ", codes.scalar_type(), " ", codes.sizes());
  check_same_device(codes, like, op, "codes");
  TORCH_CHECK(keep_bitmap.has_value() == code_offsets.has_value(), op,
              ": keep_bitmap and code_offsets must be given together");
  PackedView w{codes.data_ptr<uint8_t>(), codebook.data_ptr<float>(), channel_scale.data_ptr<float>(), nullptr,
               nullptr, out, numel / out, int(bits)};
  int64_t kept = numel;
  if (keep_bitmap.has_value()) {
    const int64_t blocks = ceil_div(numel, kCodeBlock);
    check_tensor(*keep_bitmap, at::kByte, {w.bitmap_bytes()}, like, op, "keep_bitmap");
    check_tensor(*code_offsets, at::kLong, {blocks}, like, op, "code_offsets");
    w.keep_bitmap = keep_bitmap->data_ptr<uint8_t>();
    w.code_offsets = code_offsets->data_ptr<int64_t>();
    if (!code_offsets->is_cpu()) return w;
    kept = detail::checked_index(*code_offsets, *keep_bitmap, w, op);
  }
  TORCH_CHECK(codes.numel() == ceil_div(kept * bits, 8), op, ": codes hold ", codes.numel(), " bytes but ", kept,
              " kept ", bits, "-bit codes need ", ceil_div(kept * bits, 8));
  return w;
}

}  // namespace mixedprec

// Helpers shared by every op: errors that become OrtStatus values naming the op, attribute
// reading with defaults, and ORT's intra-op thread pool.
#pragma once

#include <onnxruntime_cxx_api.h>  // ORT_API_MANUAL_INIT is defined for the whole library

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace compressor {

// A problem with the op's inputs or attributes; the message names the problem, Guard adds the op.
class OpError : public std::runtime_error {
 public:
  explicit OpError(const std::string& message, OrtErrorCode code = ORT_INVALID_ARGUMENT)
      : std::runtime_error(message), code_(code) {}
  OrtErrorCode code() const { return code_; }

 private:
  OrtErrorCode code_;
};

inline OrtStatus* MakeStatus(OrtErrorCode code, const std::string& message) {
  return Ort::GetApi().CreateStatus(code, message.c_str());
}

// Runs fn and turns every exception into an OrtStatus whose message starts with `op`, so no
// exception crosses the C boundary into onnxruntime.
template <class Fn>
OrtStatus* Guard(const char* op, Fn&& fn) noexcept {
  try {
    fn();
    return nullptr;
  } catch (const OpError& e) {
    return MakeStatus(e.code(), std::string(op) + ": " + e.what());
  } catch (const Ort::Exception& e) {
    return MakeStatus(e.GetOrtErrorCode(), std::string(op) + ": " + e.what());
  } catch (const std::bad_alloc&) {
    return MakeStatus(ORT_FAIL, std::string(op) + ": out of memory");
  } catch (const std::exception& e) {
    return MakeStatus(ORT_FAIL, std::string(op) + ": " + e.what());
  } catch (...) {
    return MakeStatus(ORT_FAIL, std::string(op) + ": unknown error");
  }
}

// Throws OpError with ORT's message if status is an error (the status is released).
inline void Check(OrtStatus* status) {
  if (status == nullptr) return;
  const OrtApi& api = Ort::GetApi();
  std::string message = api.GetErrorMessage(status);
  OrtErrorCode code = api.GetErrorCode(status);
  api.ReleaseStatus(status);
  throw OpError(message, code);
}

// ORT reports a missing attribute and a wrongly typed one with the same call; only the former
// falls back to the default.
inline bool IsMissingAttribute(OrtStatus* status) {
  const OrtApi& api = Ort::GetApi();
  std::string message = api.GetErrorMessage(status);
  bool missing = message.find("No attribute") != std::string::npos;
  if (missing) api.ReleaseStatus(status);
  return missing;
}

inline float AttributeFloat(const OrtKernelInfo* info, const char* name, float fallback) {
  float value = fallback;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &value);
  if (status != nullptr) {
    if (IsMissingAttribute(status)) return fallback;
    try {
      Check(status);
    } catch (const OpError& e) {
      throw OpError(std::string("attribute '") + name + "' must be a float: " + e.what());
    }
  }
  return value;
}

inline int64_t AttributeInt(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t value = fallback;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value);
  if (status != nullptr) {
    if (IsMissingAttribute(status)) return fallback;
    try {
      Check(status);
    } catch (const OpError& e) {
      throw OpError(std::string("attribute '") + name + "' must be an int: " + e.what());
    }
  }
  return value;
}

inline std::vector<int64_t> AttributeInts(const OrtKernelInfo* info, const char* name,
                                          std::vector<int64_t> fallback) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  OrtStatus* status = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
  if (status != nullptr) {
    if (IsMissingAttribute(status)) return fallback;
    try {
      Check(status);
    } catch (const OpError& e) {
      throw OpError(std::string("attribute '") + name + "' must be a list of ints: " + e.what());
    }
  }
  std::vector<int64_t> values(size);
  if (size > 0) Check(api.KernelInfoGetAttributeArray_int64(info, name, values.data(), &size));
  return values;
}

inline std::string AttributeString(const OrtKernelInfo* info, const char* name,
                                   const std::string& fallback) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  OrtStatus* status = api.KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (status != nullptr) {
    if (IsMissingAttribute(status)) return fallback;
    Check(status);
  }
  std::string value(size, '\0');
  Check(api.KernelInfoGetAttribute_string(info, name, value.data(), &size));
  if (!value.empty() && value.back() == '\0') value.pop_back();
  return value;
}

inline std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Runs fn(i) for i in [0, total) on ORT's intra-op thread pool (it honours the session's thread
// count and spinning setting). fn must not throw.
template <class Fn>
void ParallelFor(OrtKernelContext* context, size_t total, Fn& fn) {
  if (total == 0) return;
  if (total == 1) {
    fn(size_t{0});
    return;
  }
  auto trampoline = [](void* data, size_t i) { (*static_cast<Fn*>(data))(i); };
  Check(Ort::GetApi().KernelContext_ParallelFor(context, trampoline, total, 0, &fn));
}

// The registration struct ORT asks for, written once: every op on every execution provider is
// a KernelOp of its kernel class and the op's signature (declared once, in the op's header):
//   struct Signature {
//     static constexpr const char* kName;                         // the op type in the graph
//     static constexpr ONNXTensorElementDataType kInputs[], kOutputs[];  // element types
//     static constexpr size_t kFirstOptionalInput, kFirstOptionalOutput; // optional from here on
//   };
// The kernel is constructed from (api, info), computes in ComputeV2, and names itself in errors
// by Kernel::kLabel (e.g. "DiffConv (CUDA)"); a failing constructor becomes an ORT status too.
enum class Provider { kCpu, kCuda };

template <class Kernel, class Signature, Provider kProvider>
struct KernelOp : Ort::CustomOpBase<KernelOp<Kernel, Signature, kProvider>, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return Guard(Kernel::kLabel, [&] { *kernel = new Kernel(api, info); });
  }
  const char* GetName() const { return Signature::kName; }
  const char* GetExecutionProviderType() const {
    return kProvider == Provider::kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
  }
  size_t GetInputTypeCount() const { return std::size(Signature::kInputs); }
  ONNXTensorElementDataType GetInputType(size_t index) const { return Signature::kInputs[index]; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= Signature::kFirstOptionalInput ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return std::size(Signature::kOutputs); }
  ONNXTensorElementDataType GetOutputType(size_t index) const { return Signature::kOutputs[index]; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index >= Signature::kFirstOptionalOutput ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
};

// Adds the op (one instance for the library's lifetime, as ORT requires) to the domain.
template <class Op>
void AddOp(Ort::CustomOpDomain& domain) {
  static Op op;
  domain.Add(&op);
}

}  // namespace compressor

// cuBLAS, loaded on first use (dlopen of libcublas.so.<major>), for the few calls the
// kernels and their callers make. Binaries linking the CUDA kernels then need neither
// cuBLAS installed (a CPU-only node runs the same binaries) nor its thread-local storage
// at start: cuBLASLt's ~94 KB of TLS does not fit in the thread stacks some libraries
// use (civetweb's worker threads fail to start with EINVAL). Loaded once; thread-safe.
#pragma once

#include <cublas_v2.h>

namespace moemesh::cuda {

struct Cublas {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasGetStream_v2) get_stream = nullptr;
  // The C entry point (C++ also declares an overload taking cudaDataType as compute type).
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                            int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                            cublasGemmAlgo_t) = nullptr;
};

// nullptr when libcublas cannot be loaded (or lacks one of the calls).
const Cublas* LoadCublas();

}  // namespace moemesh::cuda

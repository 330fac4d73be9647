// cudaDataType_t as the toolkit's library_types.h has it (the values vchat uses), for the
// emulated build's cuda_runtime.h and cublasLt.h.
#pragma once

enum cudaDataType_t {
  CUDA_R_32F = 0,
  CUDA_R_16BF = 14,
};

// LLMKIT_HD: functions that compile for the host (C++) and the device (CUDA) alike, so
// that the CPU build can test the exact code the CUDA kernels run.
#pragma once

#if defined(__CUDACC__)
#define LLMKIT_HD __host__ __device__ __forceinline__
#else
#define LLMKIT_HD inline
#endif

// The CUDA built-ins kernels.cu uses, for compiling it as host C++ (tests only; see __init__.py).
//
// Blocks run one after another, each CUDA thread of a block as a fiber of its own (launch.cpp), so
// __shared__ can be a function-local static: every thread of the running block sees the same
// array, as on the GPU. __syncthreads is a barrier across those fibers.
#pragma once

#include <algorithm>
#include <math.h>

#define __global__
#define __device__
#define __shared__ static

struct uint3 { unsigned x, y, z; };
using dim3 = uint3;
struct float3 { float x, y, z; };

inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
using std::min;
using std::max;

// Set by the launcher before it resumes a fiber. Launches never overlap.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

void __syncthreads();

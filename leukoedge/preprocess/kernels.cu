// prepare_frame's three CUDA kernels (see cuda.py for the steps and the tolerance against cpu.py).
//
// This one file is compiled twice: on the GPU machine by NVRTC (nvrtc.py, no nvcc needed), and in CI
// as host C++ (tests/runtime/cuda_emulator: one fiber per CUDA thread, a barrier across a block's
// fibers for __syncthreads), so the emulation runs exactly this source. Use only the CUDA built-ins that the
// emulator's shim provides (threadIdx, blockIdx, blockDim, gridDim, __syncthreads, float3,
// make_float3, min, and the C math functions); a kernel must be `extern "C" __global__` so that
// both builds find it by its plain name.
#define LAB_EPSILON 0.008856f

__device__ float srgb_to_linear(float v) { return v <= 0.04045f ? v / 12.92f : powf((v + 0.055f) / 1.055f, 2.4f); }
__device__ float linear_to_srgb(float v) { return v <= 0.0031308f ? 12.92f * v : 1.055f * powf(v, 1.0f / 2.4f) - 0.055f; }
__device__ float lab_f(float t) { return t > LAB_EPSILON ? cbrtf(t) : 7.787f * t + 16.0f / 116.0f; }
__device__ float lab_f_inverse(float f) { return f > 0.206893f ? f * f * f : (f - 16.0f / 116.0f) / 7.787f; }

// OpenCV's float formulas: sRGB gamma, D65 matrix and white point, CIE L*a*b*.
__device__ float3 rgb_to_lab(float3 c) {
    float r = srgb_to_linear(c.x), g = srgb_to_linear(c.y), b = srgb_to_linear(c.z);
    float x = (0.412453f * r + 0.357580f * g + 0.180423f * b) / 0.950456f;
    float y = 0.212671f * r + 0.715160f * g + 0.072169f * b;
    float z = (0.019334f * r + 0.119193f * g + 0.950227f * b) / 1.088754f;
    float fx = lab_f(x), fy = lab_f(y), fz = lab_f(z);
    float l = y > LAB_EPSILON ? 116.0f * fy - 16.0f : 903.3f * y;
    return make_float3(l, 500.0f * (fx - fy), 200.0f * (fy - fz));
}

__device__ float3 lab_to_rgb(float3 lab) {
    float fy = (lab.x + 16.0f) / 116.0f, y;
    if (lab.x <= 7.9996248f) { y = lab.x / 903.3f; fy = 7.787f * y + 16.0f / 116.0f; } else { y = fy * fy * fy; }  // 903.3 * 0.008856
    float x = lab_f_inverse(lab.y / 500.0f + fy) * 0.950456f;
    float z = lab_f_inverse(fy - lab.z / 200.0f) * 1.088754f;
    float r = 3.240479f * x - 1.53715f * y - 0.498535f * z;
    float g = -0.969256f * x + 1.875991f * y + 0.041556f * z;
    float b = 0.055648f * x - 0.204043f * y + 1.057311f * z;
    r = fminf(fmaxf(r, 0.0f), 1.0f); g = fminf(fmaxf(g, 0.0f), 1.0f); b = fminf(fmaxf(b, 0.0f), 1.0f);
    return make_float3(fminf(linear_to_srgb(r), 1.0f), fminf(linear_to_srgb(g), 1.0f), fminf(linear_to_srgb(b), 1.0f));
}

__device__ float3 pixel(const unsigned char* frame, int width, int x, int y, int bgr) {
    const unsigned char* p = frame + 3 * (y * width + x);
    return bgr ? make_float3(p[2], p[1], p[0]) : make_float3(p[0], p[1], p[2]);
}

// OpenCV INTER_AREA: each output pixel averages the source area it covers, partial pixels weighted.
__device__ float3 resize_area(const unsigned char* frame, int width, int height, int dx, int dy, float sx, float sy, int bgr) {
    float x0 = dx * sx, x1 = x0 + sx, y0 = dy * sy, y1 = y0 + sy;
    float3 sum = make_float3(0.0f, 0.0f, 0.0f);
    for (int y = (int)floorf(y0); y < min(height, (int)ceilf(y1)); ++y) {
        float wy = fminf(y1, y + 1.0f) - fmaxf(y0, (float)y);
        for (int x = (int)floorf(x0); x < min(width, (int)ceilf(x1)); ++x) {
            float w = wy * (fminf(x1, x + 1.0f) - fmaxf(x0, (float)x));
            float3 v = pixel(frame, width, x, y, bgr);
            sum.x += w * v.x; sum.y += w * v.y; sum.z += w * v.z;
        }
    }
    float area = sx * sy;
    return make_float3(sum.x / area, sum.y / area, sum.z / area);
}

// OpenCV INTER_LINEAR: half-pixel centres, borders replicated.
__device__ float3 resize_bilinear(const unsigned char* frame, int width, int height, int dx, int dy, float sx, float sy, int bgr) {
    float fx = (dx + 0.5f) * sx - 0.5f, fy = (dy + 0.5f) * sy - 0.5f;
    int x = (int)floorf(fx), y = (int)floorf(fy);
    fx -= x; fy -= y;
    if (x < 0) { x = 0; fx = 0.0f; }
    if (x >= width - 1) { x = width - 1; fx = 0.0f; }
    if (y < 0) { y = 0; fy = 0.0f; }
    if (y >= height - 1) { y = height - 1; fy = 0.0f; }
    int x1 = min(x + 1, width - 1), y1 = min(y + 1, height - 1);
    float3 a = pixel(frame, width, x, y, bgr), b = pixel(frame, width, x1, y, bgr);
    float3 c = pixel(frame, width, x, y1, bgr), d = pixel(frame, width, x1, y1, bgr);
    return make_float3(
        (a.x * (1 - fx) + b.x * fx) * (1 - fy) + (c.x * (1 - fx) + d.x * fx) * fy,
        (a.y * (1 - fx) + b.y * fx) * (1 - fy) + (c.y * (1 - fx) + d.y * fx) * fy,
        (a.z * (1 - fx) + b.z * fx) * (1 - fy) + (c.z * (1 - fx) + d.z * fx) * fy);
}

__device__ float level(float v) { return fminf(fmaxf(rintf(v), 0.0f), 255.0f) / 255.0f; }

// (1) frame -> content RGB in [0, 1]; per block, the sums of L*a*b* and of their squares.
extern "C" __global__ void resize_content(
    const unsigned char* frame, int width, int height, int bgr, float* content, int content_width, int content_height,
    int area, int with_moments, double* partials) {
    __shared__ double sums[6][256];
    int dx = blockIdx.x * blockDim.x + threadIdx.x, dy = blockIdx.y * blockDim.y + threadIdx.y;
    int thread = threadIdx.y * blockDim.x + threadIdx.x;
    for (int k = 0; k < 6; ++k) sums[k][thread] = 0.0;
    if (dx < content_width && dy < content_height) {
        float sx = (float)width / content_width, sy = (float)height / content_height;
        float3 v = area ? resize_area(frame, width, height, dx, dy, sx, sy, bgr) : resize_bilinear(frame, width, height, dx, dy, sx, sy, bgr);
        float3 rgb = make_float3(level(v.x), level(v.y), level(v.z));
        float* out = content + 3 * (dy * content_width + dx);
        out[0] = rgb.x; out[1] = rgb.y; out[2] = rgb.z;
        if (with_moments) {
            float3 lab = rgb_to_lab(rgb);
            sums[0][thread] = lab.x; sums[1][thread] = lab.y; sums[2][thread] = lab.z;
            sums[3][thread] = (double)lab.x * lab.x; sums[4][thread] = (double)lab.y * lab.y; sums[5][thread] = (double)lab.z * lab.z;
        }
    }
    if (!with_moments) return;
    __syncthreads();
    for (int stride = blockDim.x * blockDim.y / 2; stride > 0; stride >>= 1) {
        if (thread < stride) for (int k = 0; k < 6; ++k) sums[k][thread] += sums[k][thread + stride];
        __syncthreads();
    }
    if (thread == 0) {
        int block = blockIdx.y * gridDim.x + blockIdx.x;
        for (int k = 0; k < 6; ++k) partials[6 * block + k] = sums[k][0];
    }
}

// (2) one block: the L*a*b* mean and std (population, floored at 1 as cpu.lab_statistics) and the gains.
extern "C" __global__ void lab_moments(const double* partials, int blocks, int pixels, const float* params, float* statistics) {
    __shared__ double sums[6][256];
    for (int k = 0; k < 6; ++k) {
        double total = 0.0;
        for (int b = threadIdx.x; b < blocks; b += blockDim.x) total += partials[6 * b + k];
        sums[k][threadIdx.x] = total;
    }
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) for (int k = 0; k < 6; ++k) sums[k][threadIdx.x] += sums[k][threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x < 3) {
        int c = threadIdx.x;
        double mean = sums[c][0] / pixels;
        double variance = fmax(sums[c + 3][0] / pixels - mean * mean, 0.0);
        float std = fmaxf((float)sqrt(variance), 1.0f);
        statistics[c] = (float)mean;
        statistics[3 + c] = std;
        statistics[6 + c] = params[3 + c] / std;  // reference std / frame std
    }
}

// (3) Reinhard (if stain), model channel order, (v - mean) / std, CHW into the letterboxed tensor.
extern "C" __global__ void normalize_into_tensor(
    const float* content, int content_width, int content_height, int stain, const float* statistics, const float* params,
    int model_bgr, float* tensor, int tensor_width, int tensor_height, int pad_x, int pad_y) {
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= content_width || y >= content_height) return;
    const float* in = content + 3 * (y * content_width + x);
    float3 rgb = make_float3(in[0], in[1], in[2]);
    if (stain) {
        float3 lab = rgb_to_lab(rgb);
        lab.x = (lab.x - statistics[0]) * statistics[6] + params[0];
        lab.y = (lab.y - statistics[1]) * statistics[7] + params[1];
        lab.z = (lab.z - statistics[2]) * statistics[8] + params[2];
        rgb = lab_to_rgb(lab);
    }
    float channels[3] = {rgb.x, rgb.y, rgb.z};
    int plane = tensor_width * tensor_height, offset = (y + pad_y) * tensor_width + (x + pad_x);
    for (int c = 0; c < 3; ++c) {
        float v = channels[model_bgr ? 2 - c : c];
        tensor[c * plane + offset] = (v - params[6 + c]) / params[9 + c];
    }
}

// kernels.cu as a host library: emulate_launch runs one kernel over a grid, as cuLaunchKernel does.
//
// Built by __init__.py with -DKERNEL_SOURCE="path/to/kernels.cu" and -DKERNELS(X)=X(name) X(name)...
// (the extern "C" __global__ functions found in that file).
#include "cuda_host_shim.h"
#include KERNEL_SOURCE

#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Whether a kernel parameter is passed as pycuda's prepare() letter says: "P" pointer, "i" int32,
// "I" uint32, "f" float, "d" double; a wrong letter would make the GPU read garbage.
template <typename T> constexpr char letter() {
    if constexpr (std::is_pointer_v<T>) return 'P';
    else if constexpr (std::is_same_v<T, int>) return 'i';
    else if constexpr (std::is_same_v<T, unsigned>) return 'I';
    else if constexpr (std::is_same_v<T, float>) return 'f';
    else if constexpr (std::is_same_v<T, double>) return 'd';
    else return '?';
}

struct Kernel {
    std::string signature;
    void (*call)(void* kernel, void** args);
    void* kernel;
};

// args[i] points at the i-th argument's value, the convention of cuLaunchKernel's kernelParams.
template <typename... Params, std::size_t... I>
void call_with(void (*kernel)(Params...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<Params>*>(args[I])...);
}

template <typename... Params> Kernel describe(void (*kernel)(Params...)) {
    return Kernel{
        std::string{letter<Params>()...},
        [](void* function, void** args) { call_with(reinterpret_cast<void (*)(Params...)>(function), args, std::index_sequence_for<Params...>{}); },
        reinterpret_cast<void*>(kernel),
    };
}

#define DESCRIBE(name) {#name, describe(name)},
const std::map<std::string, Kernel> kernels = {KERNELS(DESCRIBE)};

struct Aborted {};

// One barrier for __syncthreads and for the end of each block. Every thread of a block must take
// the same path through it: a phase that some threads reach through __syncthreads and others by
// leaving the block is a divergent __syncthreads (undefined on a GPU), and fails the launch.
struct BlockBarrier {
    std::atomic<int> at_sync{0}, at_end{0};
    std::atomic<bool> failed{false};
    std::string error;
    struct Completion {
        BlockBarrier* owner;
        void operator()() noexcept {
            if (owner->at_sync.load() && owner->at_end.load() && !owner->failed.exchange(true))
                owner->error = "__syncthreads() reached by " + std::to_string(owner->at_sync.load()) + " threads of block (" +
                               std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ") while " +
                               std::to_string(owner->at_end.load()) + " had left it";
            owner->at_sync = 0;
            owner->at_end = 0;
        }
    };
    std::barrier<Completion> barrier;
    explicit BlockBarrier(std::ptrdiff_t threads) : barrier(threads, Completion{this}) {}

    void wait(bool leaving) {
        (leaving ? at_end : at_sync).fetch_add(1);
        barrier.arrive_and_wait();
        if (failed.load()) throw Aborted{};
    }
};

BlockBarrier* current = nullptr;
std::mutex one_launch_at_a_time;

}  // namespace

void __syncthreads() { current->wait(false); }

extern "C" {

// The kernel's parameter letters (for a prepare() check), or nullptr if there is no such kernel.
const char* kernel_signature(const char* name) {
    auto found = kernels.find(name);
    return found == kernels.end() ? nullptr : found->second.signature.c_str();
}

// Run `name` over grid x block; 0 on success, else an error message in `error`.
int emulate_launch(const char* name, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned block_x, unsigned block_y,
                   unsigned block_z, void** args, char* error, std::size_t error_size) {
    auto found = kernels.find(name);
    unsigned threads = block_x * block_y * block_z;
    if (found == kernels.end() || threads == 0 || threads > 1024 || grid_x * grid_y * grid_z == 0) {
        std::snprintf(error, error_size, "invalid launch of %s: grid (%u, %u, %u), block (%u, %u, %u)", name, grid_x, grid_y, grid_z, block_x, block_y, block_z);
        return 1;
    }
    std::lock_guard<std::mutex> lock(one_launch_at_a_time);
    const Kernel& kernel = found->second;
    BlockBarrier barrier(threads);
    current = &barrier;
    blockDim = dim3{block_x, block_y, block_z};
    gridDim = dim3{grid_x, grid_y, grid_z};
    auto cuda_thread = [&](uint3 thread) {
        threadIdx = thread;
        try {
            for (unsigned z = 0; z < grid_z; ++z)
                for (unsigned y = 0; y < grid_y; ++y)
                    for (unsigned x = 0; x < grid_x; ++x) {
                        blockIdx = uint3{x, y, z};
                        kernel.call(kernel.kernel, args);
                        barrier.wait(true);
                    }
        } catch (const Aborted&) {
        }
    };
    std::vector<std::thread> workers;
    workers.reserve(threads);
    for (unsigned z = 0; z < block_z; ++z)
        for (unsigned y = 0; y < block_y; ++y)
            for (unsigned x = 0; x < block_x; ++x) workers.emplace_back(cuda_thread, uint3{x, y, z});
    for (auto& worker : workers) worker.join();
    current = nullptr;
    if (barrier.failed.load()) {
        std::snprintf(error, error_size, "%s: %s", name, barrier.error.c_str());
        return 1;
    }
    return 0;
}
}

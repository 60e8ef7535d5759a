// kernels.cu as a host library: emulate_launch runs one kernel over a grid, as cuLaunchKernel does.
//
// Built by __init__.py with -DKERNEL_SOURCE="path/to/kernels.cu" and -DKERNELS(X)=X(name) X(name)...
// (the extern "C" __global__ functions found in that file).
#include "cuda_host_shim.h"
#include KERNEL_SOURCE

#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
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

// One fiber (a user-level thread: its own stack and registers) per CUDA thread of a block, run in
// turn on one host thread: each runs until it reaches __syncthreads or leaves the kernel, then the
// next one runs. A round ends when every fiber has stopped; the barrier opens when all stopped at
// __syncthreads, the block ends when all left. A round where some did each is a divergent
// __syncthreads (undefined on a GPU) and fails the launch. Running the fibers in a fixed order
// makes a missing __syncthreads give the same wrong answer every run.
constexpr std::size_t STACK_BYTES = 256 * 1024;  // the kernels need little; AddressSanitizer's redzones more

struct Fiber {
    ucontext_t context;
    uint3 index;
    bool left;  // returned from the kernel
    void* stack;
};

struct Launch {
    const Kernel* kernel;
    void** args;
    std::vector<Fiber> fibers;
    std::size_t running;
    ucontext_t scheduler, blank;
    void* scheduler_fake_stack = nullptr;
} launch;

#if defined(__SANITIZE_ADDRESS__)
// AddressSanitizer must be told of each switch of stacks, or it reports the fibers' frames as overflows.
void* fiber_fake_stack = nullptr;
const void* scheduler_stack_bottom = nullptr;
std::size_t scheduler_stack_size = 0;
void to_fiber(Fiber& fiber) {
    __sanitizer_start_switch_fiber(&launch.scheduler_fake_stack, fiber.stack, STACK_BYTES);
    swapcontext(&launch.scheduler, &fiber.context);
    __sanitizer_finish_switch_fiber(launch.scheduler_fake_stack, nullptr, nullptr);
}
void to_scheduler(Fiber& fiber, bool leaving) {
    __sanitizer_start_switch_fiber(leaving ? nullptr : &fiber_fake_stack, scheduler_stack_bottom, scheduler_stack_size);
    swapcontext(&fiber.context, &launch.scheduler);
    __sanitizer_finish_switch_fiber(fiber_fake_stack, &scheduler_stack_bottom, &scheduler_stack_size);
}
void fiber_started() { __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack_bottom, &scheduler_stack_size); }
#else
void to_fiber(Fiber& fiber) { swapcontext(&launch.scheduler, &fiber.context); }
void to_scheduler(Fiber& fiber, bool) { swapcontext(&fiber.context, &launch.scheduler); }
void fiber_started() {}
#endif

void fiber_main() {
    fiber_started();
    Fiber& fiber = launch.fibers[launch.running];
    launch.kernel->call(launch.kernel->kernel, launch.args);
    fiber.left = true;
    to_scheduler(fiber, true);
}

// Runs one block; an empty string on success, else what went wrong.
std::string run_block() {
    for (Fiber& fiber : launch.fibers) {
        fiber.context = launch.blank;
        fiber.context.uc_stack.ss_sp = fiber.stack;
        fiber.context.uc_stack.ss_size = STACK_BYTES;
        fiber.context.uc_link = nullptr;
        fiber.left = false;
        makecontext(&fiber.context, fiber_main, 0);
    }
    for (;;) {
        std::size_t at_barrier = 0;
        for (std::size_t i = 0; i < launch.fibers.size(); ++i) {
            Fiber& fiber = launch.fibers[i];
            if (fiber.left) continue;
            launch.running = i;
            threadIdx = fiber.index;
            to_fiber(fiber);
            if (!fiber.left) ++at_barrier;
        }
        if (at_barrier == 0) return "";
        if (at_barrier != launch.fibers.size())
            return "__syncthreads() reached by " + std::to_string(at_barrier) + " threads of block (" + std::to_string(blockIdx.x) + ", " +
                   std::to_string(blockIdx.y) + ") while " + std::to_string(launch.fibers.size() - at_barrier) + " had left it";
    }
}

std::mutex one_launch_at_a_time;

}  // namespace

void __syncthreads() { to_scheduler(launch.fibers[launch.running], false); }

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
    launch.kernel = &found->second;
    launch.args = args;
    launch.fibers.assign(threads, Fiber{});
    getcontext(&launch.blank);
    std::size_t next = 0;
    for (unsigned z = 0; z < block_z; ++z)
        for (unsigned y = 0; y < block_y; ++y)
            for (unsigned x = 0; x < block_x; ++x) {
                launch.fibers[next].index = uint3{x, y, z};
                launch.fibers[next++].stack = std::malloc(STACK_BYTES);
            }
    blockDim = dim3{block_x, block_y, block_z};
    gridDim = dim3{grid_x, grid_y, grid_z};
    std::string failure;
    for (unsigned z = 0; z < grid_z && failure.empty(); ++z)
        for (unsigned y = 0; y < grid_y && failure.empty(); ++y)
            for (unsigned x = 0; x < grid_x && failure.empty(); ++x) {
                blockIdx = uint3{x, y, z};
                failure = run_block();
            }
    for (Fiber& fiber : launch.fibers) std::free(fiber.stack);
    if (!failure.empty()) {
        std::snprintf(error, error_size, "%s: %s", name, failure.c_str());
        return 1;
    }
    return 0;
}
}

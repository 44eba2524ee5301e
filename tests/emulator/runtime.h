// A CPU emulator for this project's CUDA kernels, so that their logic (indexing, tile edges,
// pipelines, warp-level fragment layouts, reductions) runs in CI without a GPU.
//
// Every CUDA thread of a block is a fiber on one OS thread; the blocks of a grid run one after
// another. A fiber runs until it meets a barrier: __syncthreads (all threads of the block), or
// a warp collective (__shfl_xor_sync, ldmatrix, mma: all 32 lanes of its warp), which deposits the
// lane's operands, waits for the warp, and computes the lane's result from every lane's operands as
// the PTX ISA defines it. Nothing here is timed or parallel: it checks results, not speed.
//
// What it checks on the way:
// - barriers not every thread reaches: a deadlock is reported with where each thread waits, and
//   threads meeting at __syncthreads calls on different source lines, or a __syncthreads that
//   threads of the block returned before (or while others wait at it), are an error;
// - warp collectives with other than a full mask, or lanes meeting at different collectives;
// - 16-byte alignment and bounds of every cp.async / ldmatrix address in dynamic shared memory, which
//   starts at a shared address that is 16-byte aligned and no more, as on a GPU (dynamic_smem_base);
// - the alignment of every load or store through a reinterpret_cast pointer (build.py makes each an
//   aligned_cast): a uint4 vector at a 16-byte boundary, a pair of 16-bit values at a 4-byte one;
// - launches beyond the grid and block limits, or over 48 KiB of dynamic shared memory without the
//   opt-in attribute; cp.async copies still pending when a thread exits; __trap;
// - races in shared memory (see Access below), out-of-range indices of static shared arrays, reads
//   of static shared elements no thread of the block wrote, and launches off the current stream;
// - wgmma (sm_90a, see wgmma_issue): malformed descriptors, operands still being written by a
//   cp.async or landed with no fence.proxy.async by their thread, warpgroups disagreeing on an op;
//   accumulators read while a wgmma still writes them read NaN.
// Blocks run one at a time, in order (ARCFACE_EMU_BLOCK_ORDER=reverse: last first).
// Built with AddressSanitizer (build.py, ARCFACE_EMU_ASAN=1) it also stops at any out-of-bounds
// access to global or shared memory, as compute-sanitizer's memcheck does on a GPU.
//
// cp.async copies land when the issuing thread waits for their group (the latest moment the PTX
// ISA allows), so reading a stage before its wait reads the poison that fills dynamic shared
// memory at the start of each block (all-ones: NaN in fp16 and bf16). ARCFACE_EMU_CP_ASYNC=issue
// lands them at once instead, which a stage overwritten while other warps still read it shows
// together with ARCFACE_EMU_SCHEDULE=greedy: the lowest runnable thread runs for as long as it can
// (warps race ahead of each other between block barriers); by default each thread takes one step
// a round.
#pragma once

#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define ARCFACE_EMU_ASAN 1
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// ---- the CUDA C++ vocabulary the kernels use ------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// build.py rewrites every __shared__ declaration (static arrays to ::emu::SharedArray, the dynamic
// one to ::emu::dynamic_shared<T>()); one it missed must not compile as an unchecked static.
#define __shared__ __shared___not_rewritten_by_build_py

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct float2 {
  float x, y;
};

inline float2 make_float2(float x, float y) { return {x, y}; }

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct cudaFuncAttributes {
  int binaryVersion;
  int ptxVersion;
  int maxDynamicSharedSizeBytes;
};

namespace emu {

[[noreturn]] inline void fail(const std::string& message) { throw std::runtime_error("CUDA emulator: " + message); }

// build.py rewrites every reinterpret_cast to a pointer type in the CUDA sources to this: the vector
// loads and stores through such casts (uint4, a pair of 16-bit values as one 32-bit word) need an
// address aligned to their size on a GPU, which raises 'misaligned address' and loses the context
// otherwise, where x86 would quietly read or write across it.
template <typename To, typename From>
To aligned_cast(From from) {
  if constexpr (std::is_pointer<To>::value && std::is_pointer<From>::value) {
    using Target = std::remove_cv_t<std::remove_pointer_t<To>>;
    if constexpr (!std::is_void<Target>::value && !std::is_function<Target>::value) {
      const auto address = reinterpret_cast<uintptr_t>(from);
      if (address % alignof(Target) != 0)
        fail("a " + std::to_string(sizeof(Target)) + "-byte access through a pointer cast at address " +
             std::to_string(address) + ", which is not " + std::to_string(alignof(Target)) +
             "-byte aligned (a GPU raises 'misaligned address')");
    }
  }
  return reinterpret_cast<To>(from);
}

constexpr int kWarp = 32;
constexpr size_t kDefaultDynamicSmemLimit = 48 * 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // sm_90's opt-in maximum per block

// ---- fibers -----------------------------------------------------------------------------------

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *from and
// resumes the context whose stack pointer is `to` (System V x86-64).
extern "C" void arcface_emu_switch(void** from, void* to);
asm(R"(
.text
.globl arcface_emu_switch
.type arcface_emu_switch, @function
arcface_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size arcface_emu_switch, .-arcface_emu_switch
)");
#else
#error "the CUDA emulator's fibers are written for x86-64"
#endif

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
  const char* what = "";
  const char* site_file = "";  // where this generation's first arrival came from (block barriers)
  int site_line = 0;
  // __syncthreads_or: the predicates of this generation's arrivals, and each finished generation's
  // result by parity (a thread reads its generation's after it resumes, possibly after others
  // have arrived at the next barrier, never the one after that).
  bool pending_or = false;
  bool finished_or[2] = {false, false};

  void finish_generation() {
    finished_or[generation & 1] = pending_or;
    pending_or = false;
    arrived = 0;
    ++generation;
  }
};

// Race detection in shared memory (racecheck's job on a GPU): each element of a static __shared__
// array and each 16-byte vector of dynamic shared memory remembers its last writer and readers
// and the barrier epoch (block, __syncthreads count) of those accesses. Two threads touching it in
// one epoch, at least one writing, is a race; so is a cp.async landing on data another thread read
// while the copy was in flight, and an ldmatrix of bytes a cp.async is still writing. Off with
// ARCFACE_EMU_RACECHECK=0.
struct Access {
  uint64_t write_epoch = 0;
  int writer = -1;
  uint64_t read_epoch = 0;
  int reader = -1;
  bool many_readers = false;
  int in_flight = 0;  // cp.async copies issued to these bytes and not landed yet
  bool unfenced = false;  // landed by a cp.async whose thread has not run fence.proxy.async since
};

struct PendingCopy {
  uint64_t issue_epoch;
  uint32_t dst;
  unsigned char data[16];  // read from global memory at issue (zeros for a zero-fill)
};

// A wgmma this thread issued and has not waited for: where its accumulators are, and its operands.
struct WgmmaPending {
  float* d;
  int n;         // the shape's N: 128, or 32 and 256 for the backward's class-outer tile; d holds n / 2
  bool b_mn;     // B MN-major (imm-trans-b 1), else K-major
  uint64_t desc_a, desc_b;
  bool bfloat16;
  bool accumulate;  // scale-d 1: D += A·Bᵀ; else D = A·Bᵀ
  uint64_t serial;  // the thread's wgmma count at issue: the same op in every thread of the warpgroup
};

struct Thread {
  void* sp = nullptr;
  char* stack = nullptr;
  uint3 idx{0, 0, 0};
  int linear = 0;
  bool done = false;
  Barrier* waiting = nullptr;
  uint64_t wait_generation = 0;
  uint64_t collectives = 0;  // warp collectives this thread has entered
  std::vector<PendingCopy> open_group;
  std::vector<std::vector<PendingCopy>> groups;
  std::vector<uint32_t> unfenced;  // 16-byte vectors its copies landed on since its last proxy fence
  uint64_t wgmma_issued = 0;
  std::vector<WgmmaPending> wgmma_open;
  std::vector<std::vector<WgmmaPending>> wgmma_groups;
  // The accumulators of this thread's pending wgmma: their values, kept here while the registers
  // themselves read NaN (wgmma_issue).
  std::map<float*, std::vector<float>> wgmma_held;
};

// A warpgroup's wgmma products A·Bᵀ (64 x N, fp32), computed by the first of its threads to wait for
// the op and taken by each of its 128 threads in turn.
struct WgmmaProduct {
  uint64_t desc_a, desc_b;
  int n;
  bool b_mn;
  bool bfloat16;
  std::vector<float> p;
  int takers;
};

struct Warpgroup {
  std::map<uint64_t, WgmmaProduct> products;
};

struct Warp {
  Barrier barrier;
  // Two deposit areas, used alternately: a lane can be one collective ahead of the slowest lane
  // (it cannot pass the next collective's barrier before every lane has read this one's).
  alignas(16) unsigned char slots[2][kWarp][64];
  const char* tags[2][kWarp];
  // A collective whose result is the same computation for every lane (mma) stores it here once.
  float results[2][kWarp][4];
  uint64_t result_of[2] = {~uint64_t{0}, ~uint64_t{0}};
};

struct Launch {
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  size_t smem_bytes = 0;
  unsigned char* smem = nullptr;
  uint32_t smem_base = 0;  // the shared-window address of smem[0] (see dynamic_smem_base)
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<Warpgroup> warpgroups;
  std::vector<Access> smem_shadow;  // one per 16 bytes of dynamic shared memory
  Barrier block_barrier;
  int live = 0;
  Thread* current = nullptr;
  void* scheduler_sp = nullptr;
  const void* scheduler_stack = nullptr;  // AddressSanitizer's view of the scheduler's stack
  size_t scheduler_stack_bytes = 0;
  std::function<void()> body;
  std::string error;
  bool issue_copies_at_once = false;
  bool greedy = false;
};

inline Launch*& active() {
  static Launch* launch = nullptr;
  return launch;
}

inline Launch& launch_state() {
  Launch* launch = active();
  if (launch == nullptr) fail("a device function ran outside a kernel launch");
  return *launch;
}

inline Thread& self() { return *launch_state().current; }

inline int lane_of(const Thread& t) { return t.linear % kWarp; }

constexpr size_t kStackBytes = 256 * 1024;

// The two directions of a switch, told to AddressSanitizer when it is on (its fiber API), so that
// it checks each fiber's frames against the right stack.
inline void switch_to_thread(Launch& l, Thread& t) {
#if defined(ARCFACE_EMU_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, t.stack, kStackBytes);
  arcface_emu_switch(&l.scheduler_sp, t.sp);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  arcface_emu_switch(&l.scheduler_sp, t.sp);
#endif
}

inline void switch_to_scheduler(Launch& l, Thread& t, bool exiting) {
#if defined(ARCFACE_EMU_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake_stack, l.scheduler_stack, l.scheduler_stack_bytes);
  arcface_emu_switch(&t.sp, l.scheduler_sp);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)exiting;
  arcface_emu_switch(&t.sp, l.scheduler_sp);
#endif
}

inline void yield_to_scheduler() {
  Launch& l = launch_state();
  switch_to_scheduler(l, *l.current, false);
}

inline std::string describe_waits(const Launch& l) {
  std::string text;
  int shown = 0;
  for (const Thread& t : l.threads) {
    if (t.done || shown == 8) continue;
    ++shown;
    text += "\n  thread " + std::to_string(t.linear) + " waits at " +
            (t.waiting != nullptr ? std::string(t.waiting->what) : std::string("nothing"));
  }
  return text;
}

inline void arrive_and_wait(Barrier& barrier) {
  Thread& t = self();
  const uint64_t generation = barrier.generation;
  if (++barrier.arrived == barrier.expected) {
    barrier.finish_generation();
    return;
  }
  t.waiting = &barrier;
  t.wait_generation = generation;
  yield_to_scheduler();
}

inline bool env_is(const char* name, const char* value) {
  const char* setting = std::getenv(name);
  return setting != nullptr && std::strcmp(setting, value) == 0;
}

inline uint64_t& block_serial() {
  static uint64_t serial = 0;  // counts every block run in this process: epochs never repeat
  return serial;
}

inline uint64_t current_epoch() {
  return (block_serial() << 32) + launch_state().block_barrier.generation + 1;
}

inline bool racecheck() {
  static const bool on = !env_is("ARCFACE_EMU_RACECHECK", "0");
  return on;
}

[[noreturn]] inline void race(const char* kind, int thread, int other, const std::string& where) {
  fail(std::string("shared-memory race (") + kind + ") on " + where + ": threads " + std::to_string(other) +
       " and " + std::to_string(thread) + " with no __syncthreads between");
}

inline std::string element(const char* name, int64_t index) { return std::string(name) + "[" + std::to_string(index) + "]"; }

inline void record_read(Access& a, const char* name, int64_t index) {
  if (!racecheck()) return;
  const uint64_t epoch = current_epoch();
  const int thread = self().linear;
  if (a.write_epoch == epoch && a.writer != thread) race("read after write", thread, a.writer, element(name, index));
  if (a.read_epoch == epoch) {
    a.many_readers = a.many_readers || a.reader != thread;
  } else {
    a.read_epoch = epoch;
    a.reader = thread;
    a.many_readers = false;
  }
}

inline void record_write(Access& a, const char* name, int64_t index) {
  if (!racecheck()) return;
  const uint64_t epoch = current_epoch();
  const int thread = self().linear;
  if (a.write_epoch == epoch && a.writer != thread) race("write after write", thread, a.writer, element(name, index));
  if (a.read_epoch == epoch && (a.many_readers || a.reader != thread))
    race("write after read", thread, a.many_readers ? -1 : a.reader, element(name, index));
  a.write_epoch = epoch;
  a.writer = thread;
}

inline void land(Launch& l, const PendingCopy& copy) {
  const uint32_t offset = copy.dst - l.smem_base;
  if (racecheck()) {
    Access& a = l.smem_shadow[offset / 16];
    --a.in_flight;
    const int thread = l.current->linear;
    if (a.read_epoch >= copy.issue_epoch && (a.many_readers || a.reader != thread))
      race("cp.async landing on data read while it was in flight", thread, a.many_readers ? -1 : a.reader,
           element("dynamic shared memory, byte", copy.dst));
    record_write(a, "dynamic shared memory, byte", copy.dst);
  }
  l.smem_shadow[offset / 16].unfenced = true;
  l.current->unfenced.push_back(offset / 16);
  std::memcpy(l.smem + offset, copy.data, 16);
}

void fiber_entry();

inline void prepare_fiber(Thread& t, size_t stack_bytes) {
#if defined(ARCFACE_EMU_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(t.stack, stack_bytes);  // frames a previous block left behind
#endif
  // The first switch to this fiber "returns" into fiber_entry with the stack aligned as at a call.
  auto* top = reinterpret_cast<uintptr_t*>(t.stack + stack_bytes - 64);
  top = reinterpret_cast<uintptr_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t{15});
  top[0] = reinterpret_cast<uintptr_t>(&fiber_entry);
  top[1] = 0;
  t.sp = top - 6;  // six callee-saved registers, popped as zeros
  std::memset(t.sp, 0, 6 * sizeof(uintptr_t));
}

inline void fiber_entry() {
  Launch& l = launch_state();
  Thread& t = *l.current;
#if defined(ARCFACE_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &l.scheduler_stack, &l.scheduler_stack_bytes);
#endif
  try {
    l.body();
    if (!t.open_group.empty() || !t.groups.empty())
      throw std::runtime_error("cp.async copies still pending when the thread exited");
    if (!t.wgmma_open.empty() || !t.wgmma_groups.empty())
      throw std::runtime_error("wgmma operations still pending when the thread exited");
    // Threads of the block waiting at a __syncthreads this one never reaches (emulated_syncthreads).
    if (l.block_barrier.arrived > 0)
      throw std::runtime_error(std::string("a thread returned while others wait at the __syncthreads at ") +
                               l.block_barrier.site_file + ":" + std::to_string(l.block_barrier.site_line) +
                               ": a barrier not every thread reaches");
  } catch (const std::exception& e) {
    if (l.error.empty()) l.error = e.what();
  }
  t.done = true;
  --l.live;
  // An exited thread no longer counts at the block barrier.
  --l.block_barrier.expected;
  if (l.block_barrier.arrived > 0 && l.block_barrier.arrived == l.block_barrier.expected) {
    l.block_barrier.finish_generation();
  }
  switch_to_scheduler(l, t, true);
  std::abort();  // never resumed
}

struct Stacks {
  static constexpr size_t kBytes = kStackBytes;
  std::vector<char*> stacks;
  ~Stacks() {
    for (char* s : stacks) munmap(s - 4096, kBytes + 4096);
  }
  char* get(size_t i) {
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, kBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) fail("cannot map a fiber stack");
      mprotect(p, 4096, PROT_NONE);  // guard page below the stack
      stacks.push_back(static_cast<char*>(p) + 4096);
    }
    return stacks[i];
  }
};

inline Stacks& stacks() {
  static Stacks s;
  return s;
}

inline std::map<const void*, size_t>& smem_opt_in() {
  static std::map<const void*, size_t> limits;
  return limits;
}

inline unsigned check_dim(long long value, long long limit, const char* what) {
  if (value < 1 || value > limit)
    fail(std::string("launch: ") + what + " = " + std::to_string(value) + " is outside [1, " +
         std::to_string(limit) + "]");
  return static_cast<unsigned>(value);
}

// The shared-window address at which a block's dynamic shared memory starts. On a GPU it follows the
// kernel's static __shared__ arrays (6,784 bytes in the fused tiles, ptxas for sm_90a), 16-byte aligned
// and nothing more: a kernel that needs more (wgmma's swizzle atoms, 1024 bytes) must round the address
// up itself. The emulator starts it there too (ARCFACE_EMU_SMEM_BASE, 16-byte aligned, sets another),
// so that cp.async, ldmatrix and wgmma see the addresses a GPU gives; at 0 a kernel that forgot to round
// would pass here and multiply garbage there.
inline uint32_t dynamic_smem_base() {
  const char* setting = std::getenv("ARCFACE_EMU_SMEM_BASE");
  const long long base = setting != nullptr ? std::atoll(setting) : 6784;
  if (base < 0 || base % 16 != 0 || base > 64 * 1024)
    fail("ARCFACE_EMU_SMEM_BASE must be a multiple of 16 in [0, 65536], got " + std::to_string(base));
  return static_cast<uint32_t>(base);
}

inline std::vector<std::string>& launch_log() {
  static std::vector<std::string> names;
  return names;
}

// Runs `body` (the kernel call) as every thread of every block of the grid.
inline void run_grid(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
  check_dim(grid.x, 2147483647LL, "gridDim.x");
  check_dim(grid.y, 65535, "gridDim.y");
  check_dim(grid.z, 65535, "gridDim.z");
  const long long threads = static_cast<long long>(block.x) * block.y * block.z;
  check_dim(threads, 1024, "threads per block");
  if (threads % kWarp != 0) fail("launch: the emulator wants whole warps per block");
  size_t limit = kDefaultDynamicSmemLimit;
  auto found = smem_opt_in().find(kernel);
  if (found != smem_opt_in().end()) limit = found->second;
  if (smem_bytes > limit)
    fail("launch: " + std::to_string(smem_bytes) + " bytes of dynamic shared memory without the opt-in "
         "attribute (limit " + std::to_string(limit) + ")");
  if (active() != nullptr) fail("launch: a kernel launched from inside a kernel");
  launch_log().push_back(name);
  if (smem_bytes > 0) launch_log().push_back("smem:" + std::to_string(smem_bytes));
  launch_log().push_back("grid:" + std::to_string(grid.x) + "x" + std::to_string(grid.y));

  Launch l;
  l.grid = grid;
  l.block = block;
  l.smem_bytes = smem_bytes;
  l.smem_base = dynamic_smem_base();
  // Exactly smem_bytes (AddressSanitizer then sees a read past the end), 16-byte aligned.
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, Free> smem(
      static_cast<unsigned char*>(std::aligned_alloc(16, std::max<size_t>(16, (smem_bytes + 15) / 16 * 16))));
  l.smem = smem.get();
  l.threads.resize(threads);
  l.warps.resize(threads / kWarp);
  l.body = std::move(body);
  l.issue_copies_at_once = env_is("ARCFACE_EMU_CP_ASYNC", "issue");
  l.greedy = env_is("ARCFACE_EMU_SCHEDULE", "greedy");
  active() = &l;
  struct Reset {
    ~Reset() { active() = nullptr; }
  } reset;

  // Blocks run one at a time, in order, or last first with ARCFACE_EMU_BLOCK_ORDER=reverse (a
  // kernel whose blocks depend on each other's order then shows).
  const bool reverse = env_is("ARCFACE_EMU_BLOCK_ORDER", "reverse");
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t b = reverse ? blocks - 1 - k : k;
    const unsigned bx = static_cast<unsigned>(b % grid.x);
    const unsigned by = static_cast<unsigned>(b / grid.x % grid.y);
    const unsigned bz = static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y));
    l.block_idx = {bx, by, bz};
    ++block_serial();
    l.smem_shadow.assign(smem_bytes / 16 + 1, Access{});
    std::memset(l.smem, 0xff, smem_bytes);
    l.block_barrier = Barrier{static_cast<int>(threads), 0, 0, "__syncthreads"};
    for (Warp& w : l.warps) {
      w.barrier = Barrier{kWarp, 0, 0, "a warp collective"};
      w.result_of[0] = w.result_of[1] = ~uint64_t{0};
    }
    l.warpgroups.assign(threads / 128, Warpgroup{});
    l.live = static_cast<int>(threads);
    for (long long i = 0; i < threads; ++i) {
      Thread& t = l.threads[i];
      t = Thread{};
      t.linear = static_cast<int>(i);
      t.idx = {static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
               static_cast<unsigned>(i / (block.x * block.y))};
      t.stack = stacks().get(i);
      prepare_fiber(t, Stacks::kBytes);
    }
    while (l.live > 0) {
      bool progressed = false;
      for (Thread& t : l.threads) {
        if (t.done) continue;
        if (t.waiting != nullptr && t.waiting->generation == t.wait_generation) continue;
        t.waiting = nullptr;
        l.current = &t;
        switch_to_thread(l, t);
        l.current = nullptr;
        progressed = true;
        if (!l.error.empty()) {
          const std::string prefix = "CUDA emulator: ";
          const std::string what = l.error.rfind(prefix, 0) == 0 ? l.error.substr(prefix.size()) : l.error;
          fail("block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " + std::to_string(bz) +
               ") thread " + std::to_string(t.linear) + ": " + what);
        }
        if (l.greedy) break;
      }
      if (!progressed) fail("deadlock in block (" + std::to_string(bx) + ", " + std::to_string(by) + "):" +
                            describe_waits(l));
    }
  }
}

template <typename Kernel>
struct Launcher {
  Kernel* kernel;
  const char* name;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(const Args&... args) const {
    Kernel* k = kernel;
    run_grid(reinterpret_cast<const void*>(k), name, grid, block, smem, [&]() { k(args...); });
  }
};

inline dim3 as_dim3(dim3 d) { return d; }
template <typename I, typename = std::enable_if_t<std::is_integral<I>::value>>
inline dim3 as_dim3(I i) {
  if (i < 1 || static_cast<long long>(i) > 2147483647LL) fail("launch: a grid or block size of " + std::to_string(i));
  return dim3(static_cast<unsigned>(i));
}

// kernel<<<grid, block, smem, stream>>>(args) is rewritten to
// launch(kernel, "kernel", grid, block, smem, stream)(args).
// The stream is required (the kernels launch on the current stream, which the stand-in
// getCurrentCUDAStream gives as current_stream()): a launch on the legacy default stream fails.
inline cudaStream_t current_stream() { return reinterpret_cast<cudaStream_t>(uintptr_t{0x5eed}); }

template <typename Kernel, typename G, typename B>
Launcher<Kernel> launch(Kernel* kernel, const char* name, G grid, B block, size_t smem, cudaStream_t stream) {
  if (stream != current_stream()) fail(std::string("launch of ") + name + " on another stream than the current one");
  return Launcher<Kernel>{kernel, name, as_dim3(grid), as_dim3(block), smem};
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(launch_state().smem);
}

// ---- warp collectives ---------------------------------------------------------------------------

// Every lane's `mine`, after every lane of the warp has given its own; `tag` names the collective
// (lanes that meet at different collectives are an error).
template <typename T>
std::array<T, kWarp> warp_gather(const T& mine, const char* tag) {
  static_assert(sizeof(T) <= 64 && std::is_trivially_copyable<T>::value, "warp deposit");
  Launch& l = launch_state();
  Thread& t = *l.current;
  Warp& w = l.warps[t.linear / kWarp];
  const int slot = static_cast<int>(t.collectives++ & 1);
  const int lane = lane_of(t);
  std::memcpy(w.slots[slot][lane], &mine, sizeof(T));
  w.tags[slot][lane] = tag;
  arrive_and_wait(w.barrier);
  std::array<T, kWarp> all;
  for (int i = 0; i < kWarp; ++i) {
    if (std::strcmp(w.tags[slot][i], tag) != 0)
      fail(std::string("warp collective mismatch: lane ") + std::to_string(lane) + " at " + tag + ", lane " +
           std::to_string(i) + " at " + w.tags[slot][i]);
    std::memcpy(&all[i], w.slots[slot][i], sizeof(T));
  }
  return all;
}

inline void check_full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail(std::string(what) + " with a partial mask: the emulator wants whole warps");
}

// A shared address's byte offset in the block's dynamic shared memory (bounds checked: `bytes` from
// it must lie inside).
inline uint32_t smem_offset(uint32_t address, uint32_t bytes, const char* what) {
  const Launch& l = launch_state();
  if (address < l.smem_base || uint64_t{address} - l.smem_base + bytes > l.smem_bytes)
    fail(std::string(what) + ": shared address " + std::to_string(address) + " is outside the " +
         std::to_string(l.smem_bytes) + " bytes of dynamic shared memory at " + std::to_string(l.smem_base));
  return address - l.smem_base;
}

// The 16-byte vector at a shared address: its offset in dynamic shared memory (see smem_offset).
inline uint32_t check_smem_vector(uint32_t address, const char* what) {
  if (address % 16 != 0) fail(std::string(what) + ": shared address " + std::to_string(address) + " is not 16-byte aligned");
  return smem_offset(address, 16, what);
}

inline uint16_t smem_u16(uint32_t address) {
  uint16_t v;
  std::memcpy(&v, launch_state().smem + smem_offset(address, 2, "a wgmma operand"), 2);
  return v;
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7 give the addresses of the rows of
// matrix j (8 consecutive b16); lane l receives in r[j] row l/4, elements 2(l%4) and 2(l%4)+1 of
// matrix j (the lower element in the lower half).
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  Access& vector = launch_state().smem_shadow[check_smem_vector(address, "ldmatrix") / 16];
  // Reading bytes a cp.async is still writing is a race whoever issued it (the issuer too: its
  // copy is only visible after its wait).
  if (racecheck() && vector.in_flight > 0)
    fail("ldmatrix reads " + element("dynamic shared memory, byte", address) + " while a cp.async to it is in flight");
  record_read(vector, "dynamic shared memory, byte", address);
  const auto addresses = warp_gather(address, "ldmatrix.x4");
  const int lane = lane_of(self());
  for (int j = 0; j < 4; ++j) {
    const uint32_t row = addresses[8 * j + lane / 4];
    const uint32_t lo = smem_u16(row + 2 * (2 * (lane % 4)));
    const uint32_t hi = smem_u16(row + 2 * (2 * (lane % 4) + 1));
    r[j] = lo | (hi << 16);
  }
}

// A bf16 or fp16 bit pattern as a float (exact); fp16 through a table of all 65536 patterns.
inline float half_bits_to_float(uint16_t bits, bool bfloat16) {
  if (bfloat16) {
    const uint32_t word = uint32_t{bits} << 16;
    float f;
    std::memcpy(&f, &word, sizeof(f));
    return f;
  }
  static const std::vector<float> table = [] {
    std::vector<float> values(65536);
    for (uint32_t h = 0; h < 65536; ++h) {
      const int exponent = (h >> 10) & 0x1f;
      const uint32_t mantissa = h & 0x3ffu;
      float magnitude;
      if (exponent == 0) {
        magnitude = std::ldexp(static_cast<float>(mantissa), -24);
      } else if (exponent == 31) {
        magnitude = mantissa != 0 ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
      } else {
        magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), exponent - 25);
      }
      values[h] = (h & 0x8000u) != 0 ? -magnitude : magnitude;
    }
    return values;
  }();
  return table[bits];
}

// ex2.approx.ftz.f32: 2^x with subnormal inputs and results flushed to zero. The hardware's
// result is within 2^-22 of the exact one; this returns the correctly rounded 2^x, so the emulator
// checks the expressions, not that approximation (the GPU's tolerances cover it).
inline float ex2_approx(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? std::copysign(0.0f, y) : y;
}

struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: with g = lane/4, t = lane%4,
//   a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1], a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]
//   b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   d0 = D[g][2t], d1 = D[g][2t+1], d2 = D[g+8][2t], d3 = D[g+8][2t+1]
// (the lower 16 bits hold the lower index). The products are exact in fp32 and summed in fp32,
// in k order, then added to the accumulator. The first lane past the barrier computes the whole
// warp's D; the others copy their fragment of it.
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bfloat16) {
  MmaOperands mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  std::memcpy(mine.c, d, sizeof(mine.c));
  Launch& l = launch_state();
  Thread& self_thread = *l.current;
  Warp& w = l.warps[self_thread.linear / kWarp];
  const uint64_t collective = self_thread.collectives;  // this collective's number, before gather
  const auto all = warp_gather(mine, bfloat16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16");
  const int slot = static_cast<int>(collective & 1);
  if (w.result_of[slot] != collective) {
    float A[16][16], B[16][8];
    for (int lane = 0; lane < kWarp; ++lane) {
      const int g = lane / 4, t = lane % 4;
      const MmaOperands& o = all[lane];
      const int rows[4] = {g, g + 8, g, g + 8};
      const int cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int q = 0; q < 4; ++q) {
        A[rows[q]][cols[q]] = half_bits_to_float(static_cast<uint16_t>(o.a[q] & 0xffff), bfloat16);
        A[rows[q]][cols[q] + 1] = half_bits_to_float(static_cast<uint16_t>(o.a[q] >> 16), bfloat16);
      }
      for (int q = 0; q < 2; ++q) {
        B[2 * t + 8 * q][g] = half_bits_to_float(static_cast<uint16_t>(o.b[q] & 0xffff), bfloat16);
        B[2 * t + 8 * q + 1][g] = half_bits_to_float(static_cast<uint16_t>(o.b[q] >> 16), bfloat16);
      }
    }
    for (int lane = 0; lane < kWarp; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int q = 0; q < 4; ++q) {
        const int row = g + 8 * (q / 2), col = 2 * t + q % 2;
        float sum = 0.0f;
        for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
        w.results[slot][lane][q] = all[lane].c[q] + sum;
      }
    }
    w.result_of[slot] = collective;
  }
  std::memcpy(d, w.results[slot][lane_of(self_thread)], sizeof(float) * 4);
}

// cp.async.cg.shared.global 16 bytes, zero-filled when !valid; lands when the thread waits for
// its group (or at once with ARCFACE_EMU_CP_ASYNC=issue).
inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const uint32_t offset = check_smem_vector(dst, "cp.async");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: a global source that is not 16-byte aligned");
  Launch& l = launch_state();
  PendingCopy copy;
  copy.dst = dst;
  copy.issue_epoch = current_epoch();
  // The source is read here, where the instruction names it (global memory does not change while
  // a kernel runs), so that an out-of-bounds source is reported at its cp.async.
  if (valid) {
    std::memcpy(copy.data, src, 16);
  } else {
    std::memset(copy.data, 0, 16);
  }
  if (racecheck()) ++l.smem_shadow[offset / 16].in_flight;  // until land() takes it back
  if (l.issue_copies_at_once) {
    land(l, copy);
  } else {
    l.current->open_group.push_back(copy);
  }
}

inline void cp_async_commit() {
  Thread& t = self();
  t.groups.push_back(std::move(t.open_group));
  t.open_group.clear();
}

inline void cp_async_wait(int pending) {
  Launch& l = launch_state();
  Thread& t = *l.current;
  while (static_cast<int>(t.groups.size()) > pending) {
    for (const PendingCopy& copy : t.groups.front()) land(l, copy);
    t.groups.erase(t.groups.begin());
  }
}

// fence.proxy.async.shared::cta: this thread's landed copies become visible to the async proxy
// (wgmma's operand reads); a wgmma reading bytes still unfenced is an error.
inline void fence_proxy_async() {
  Launch& l = launch_state();
  Thread& t = *l.current;
  for (uint32_t vector : t.unfenced) l.smem_shadow[vector].unfenced = false;
  t.unfenced.clear();
}

// The shared address of element (row, k) of a K-major 16-bit operand in a swizzled layout, as the
// descriptor gives it: start address (bits 0-13, in 16 bytes), stride between 8-row groups (bits
// 32-45, in 16 bytes), base offset (bits 49-51) and layout (bits 62-63: 1 the 128-byte swizzle, 2 the
// 64-byte one). A row of the layout is as wide as its swizzle: row r of a group sits pitch·(r % 8)
// bytes in, and the swizzle XORs the address bits of the 16-byte chunk (4-6, or 4-5) with as many bits
// from bit 7 up (the row within the atom of 8 rows). Only what the kernels use is modelled: those two
// swizzles, base offset 0, and a start whose 16-deep step stays inside the atom's first row.
inline uint32_t wgmma_pitch(uint64_t desc) { return (desc >> 62) == 1 ? 128 : 64; }

inline uint32_t wgmma_operand_address(uint64_t desc, int row, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3fff) << 4;
  const uint32_t stride = static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4;
  const uint32_t pitch = wgmma_pitch(desc);
  const uint32_t linear = start + static_cast<uint32_t>(row / 8) * stride + static_cast<uint32_t>(row % 8) * pitch +
                          2 * static_cast<uint32_t>(k);
  return linear ^ (((linear >> 7) & (pitch / 16 - 1)) << 4);
}

// The same for an MN-major operand (imm-trans 1) in the 128-byte swizzle, the one such layout the
// kernels use (CUTLASS's canonical ((8T, m), (8, k)) : ((1, LBO), (8T, SBO)) with T = 8 values): an
// atom's 128-byte row holds 64 consecutive MN values at one k, its 8 rows are 8 consecutive k; the next
// 64 MN values sit LBO bytes on (bits 16-29, in 16 bytes), the next 8 k SBO bytes on (bits 32-45).
inline uint32_t wgmma_operand_address_mn(uint64_t desc, int mn, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3fff) << 4;
  const uint32_t leading = static_cast<uint32_t>((desc >> 16) & 0x3fff) << 4;
  const uint32_t stride = static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4;
  const uint32_t linear = start + static_cast<uint32_t>(mn / 64) * leading + static_cast<uint32_t>(k / 8) * stride +
                          static_cast<uint32_t>(k % 8) * 128 + 2 * static_cast<uint32_t>(mn % 64);
  return linear ^ (((linear >> 7) & 7) << 4);
}

// `rows` the operand's M or N (the rows of a K-major operand; the MN extent of an MN-major one).
inline void check_wgmma_descriptor(uint64_t desc, int rows, bool mn_major, const char* which) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3fff) << 4;
  const uint32_t leading = static_cast<uint32_t>((desc >> 16) & 0x3fff) << 4;
  const uint32_t stride = static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4;
  const std::string what = std::string("wgmma operand ") + which + ": ";
  const uint64_t layout = desc >> 62;
  if (((desc >> 49) & 7) != 0) fail(what + "a non-zero base offset");
  uint32_t last;
  if (mn_major) {
    if (layout != 1) fail(what + "the emulator models MN-major operands in the 128-byte swizzle only (layout 1)");
    if (start % 1024 != 0) fail(what + "MN-major start address " + std::to_string(start) + " is not a swizzle atom's");
    if (leading % 1024 != 0 || stride % 1024 != 0)
      fail(what + "MN-major atoms " + std::to_string(leading) + " (LBO) and " + std::to_string(stride) +
           " (SBO) bytes apart break the atoms");
    if (rows > 64 && leading == 0) fail(what + "an MN-major operand wider than an atom with LBO 0");
    last = start + static_cast<uint32_t>((rows - 1) / 64) * leading + stride + 1024;  // k = 0..15: two groups
  } else {
    if (layout != 1 && layout != 2) fail(what + "the emulator models the 128- and 64-byte swizzles only (layouts 1, 2)");
    const uint32_t pitch = wgmma_pitch(desc);
    if (((start >> 7) & (pitch / 16 - 1)) != 0)
      fail(what + "start address " + std::to_string(start) + " is not in a swizzle atom's first row");
    if ((start % pitch) + 32 > pitch) fail(what + "a 16-deep step crossing the swizzled row");
    if (stride % (8 * pitch) != 0)
      fail(what + "8-row groups " + std::to_string(stride) + " bytes apart break the atoms");
    last = start - start % pitch + static_cast<uint32_t>((rows - 1) / 8) * stride + 8 * pitch;
  }
  const Launch& l = launch_state();
  if (start < l.smem_base || last > l.smem_base + l.smem_bytes)
    fail(what + "rows from byte " + std::to_string(start) + " to " + std::to_string(last) + " outside the " +
         std::to_string(l.smem_bytes) + " bytes of dynamic shared memory at " + std::to_string(l.smem_base));
}

// Reads the rows x 16 operand through its descriptor (with the race and proxy-fence checks of every
// 16-byte vector), as floats: values[r·16 + k], r the operand's M or N index.
inline std::vector<float> wgmma_operand(uint64_t desc, int rows, bool mn_major, bool bfloat16, const char* which) {
  check_wgmma_descriptor(desc, rows, mn_major, which);
  Launch& l = launch_state();
  auto check_vector = [&](uint32_t vector) {
    Access& a = l.smem_shadow[smem_offset(vector, 16, "a wgmma operand") / 16];
    if (racecheck() && a.in_flight > 0)
      fail(std::string("wgmma reads ") + element("dynamic shared memory, byte", vector) +
           " while a cp.async to it is in flight");
    if (a.unfenced)
      fail(std::string("wgmma reads ") + element("dynamic shared memory, byte", vector) +
           ", landed by a cp.async whose thread ran no fence.proxy.async since");
    record_read(a, "dynamic shared memory, byte", vector);
  };
  std::vector<float> values(static_cast<size_t>(rows) * 16);
  if (mn_major) {
    for (int k = 0; k < 16; ++k)
      for (int chunk = 0; chunk < rows / 8; ++chunk) check_vector(wgmma_operand_address_mn(desc, 8 * chunk, k));
    for (int r = 0; r < rows; ++r)
      for (int k = 0; k < 16; ++k)
        values[r * 16 + k] = half_bits_to_float(smem_u16(wgmma_operand_address_mn(desc, r, k)), bfloat16);
    return values;
  }
  for (int r = 0; r < rows; ++r) {
    for (int half = 0; half < 2; ++half) check_vector(wgmma_operand_address(desc, r, 8 * half));
    for (int k = 0; k < 16; ++k) values[r * 16 + k] = half_bits_to_float(smem_u16(wgmma_operand_address(desc, r, k)), bfloat16);
  }
  return values;
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}, A K-major and B K-major (or MN-major with
// b_mn: imm-trans-b 1) in shared memory: D += A·Bᵀ with `accumulate` (scale-d 1), else D = A·Bᵀ; A the
// warpgroup's 64 rows, B N rows. Issued here; it completes (reads shared memory and writes the
// accumulators) when the thread waits for its group, the latest moment the PTX ISA allows. Thread
// (warp q of the warpgroup, lane) holds D[16q + lane/4 + 8h][8j + 2(lane % 4) + e] in d[4j + 2h + e]
// (j < N/8); the products are exact in fp32 and summed in k order, then added to d (or written to it,
// without accumulate). From issue until the wait that completes the last pending op on them, the
// registers read NaN (their values wait in Thread::wgmma_held): code that reads accumulators a wgmma in
// flight still writes, which the hardware leaves undefined, gets NaN losses here.
inline void wgmma_issue(float* d, int n, bool b_mn, uint64_t desc_a, uint64_t desc_b, bool bfloat16, bool accumulate) {
  Launch& l = launch_state();
  if (l.threads.size() % 128 != 0) fail("wgmma in a block that is not whole warpgroups");
  Thread& t = *l.current;
  auto held = t.wgmma_held.find(d);
  if (held == t.wgmma_held.end()) {
    t.wgmma_held.emplace(d, std::vector<float>(d, d + n / 2));
    std::fill(d, d + n / 2, std::numeric_limits<float>::quiet_NaN());
  } else if (static_cast<int>(held->second.size()) != n / 2) {
    fail("wgmma ops of different shapes on one accumulator array while one is pending");
  }
  t.wgmma_open.push_back(WgmmaPending{d, n, b_mn, desc_a, desc_b, bfloat16, accumulate, t.wgmma_issued++});
}

inline void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool bfloat16, bool accumulate) {
  wgmma_issue(d, 128, false, desc_a, desc_b, bfloat16, accumulate);
}

inline void wgmma_commit() {
  Thread& t = self();
  t.wgmma_groups.push_back(std::move(t.wgmma_open));
  t.wgmma_open.clear();
}

inline void wgmma_complete(const WgmmaPending& op) {
  Launch& l = launch_state();
  Thread& t = *l.current;
  Warpgroup& group = l.warpgroups[t.linear / 128];
  auto found = group.products.find(op.serial);
  if (found == group.products.end()) {
    const std::vector<float> a = wgmma_operand(op.desc_a, 64, false, op.bfloat16, "A");
    const std::vector<float> b = wgmma_operand(op.desc_b, op.n, op.b_mn, op.bfloat16, "B");
    WgmmaProduct product{op.desc_a, op.desc_b, op.n, op.b_mn, op.bfloat16, std::vector<float>(64 * op.n), 128};
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < op.n; ++n) {
        float sum = 0.0f;
        for (int k = 0; k < 16; ++k) sum += a[m * 16 + k] * b[n * 16 + k];
        product.p[m * op.n + n] = sum;
      }
    found = group.products.emplace(op.serial, std::move(product)).first;
  } else if (found->second.desc_a != op.desc_a || found->second.desc_b != op.desc_b || found->second.n != op.n ||
             found->second.b_mn != op.b_mn || found->second.bfloat16 != op.bfloat16) {
    fail("the threads of a warpgroup gave one wgmma different operands");
  }
  const int q = t.linear % 128 / kWarp, lane = lane_of(t);
  std::vector<float>& d = t.wgmma_held.at(op.d);
  for (int j = 0; j < op.n / 8; ++j)
    for (int h = 0; h < 2; ++h)
      for (int e = 0; e < 2; ++e) {
        const float p = found->second.p[(16 * q + lane / 4 + 8 * h) * op.n + 8 * j + 2 * (lane % 4) + e];
        float& value = d[4 * j + 2 * h + e];
        value = op.accumulate ? value + p : p;
      }
  if (--found->second.takers == 0) group.products.erase(found);
}

inline void wgmma_wait(int pending) {
  Thread& t = self();
  while (static_cast<int>(t.wgmma_groups.size()) > pending) {
    for (const WgmmaPending& op : t.wgmma_groups.front()) wgmma_complete(op);
    t.wgmma_groups.erase(t.wgmma_groups.begin());
  }
  // Accumulators no pending op writes any more are the thread's again.
  for (auto held = t.wgmma_held.begin(); held != t.wgmma_held.end();) {
    bool pending_on_it = false;
    for (const WgmmaPending& op : t.wgmma_open) pending_on_it |= op.d == held->first;
    for (const std::vector<WgmmaPending>& group : t.wgmma_groups)
      for (const WgmmaPending& op : group) pending_on_it |= op.d == held->first;
    if (pending_on_it) {
      ++held;
    } else {
      std::copy(held->second.begin(), held->second.end(), held->first);
      held = t.wgmma_held.erase(held);
    }
  }
}

inline uint32_t shared_offset(const void* p) {
  const Launch& l = launch_state();
  const auto* byte = static_cast<const unsigned char*>(p);
  if (byte < l.smem || byte >= l.smem + l.smem_bytes)
    fail("__cvta_generic_to_shared: a pointer outside dynamic shared memory");
  return l.smem_base + static_cast<uint32_t>(byte - l.smem);
}

}  // namespace emu

// ---- static shared arrays, with race detection ------------------------------------------------

namespace emu {

// build.py rewrites `__shared__ T name[A][B];` to `static ::emu::SharedArray<T, A, B> name("name");`:
// an element access goes through SharedRef, which records it and checks the bounds.
// A read of an element no thread of this block has written is an error (on a GPU it reads whatever
// the previous block left, or garbage), and so is a reference used after a barrier it was made
// before (`auto v = a[i]; __syncthreads(); use(v)` would read in the wrong epoch).
template <typename T>
struct SharedRef {
  T* value;
  Access* access;
  const char* name;
  int64_t index;
  uint64_t epoch;  // when the reference was made
  void check_epoch() const {
    if (current_epoch() != epoch)
      fail("a reference to " + element(name, index) + " was made before a __syncthreads and used after it");
  }
  operator T() const {
    check_epoch();
    if (racecheck() && (access->write_epoch >> 32) != block_serial())
      fail("thread " + std::to_string(self().linear) + " reads " + element(name, index) +
           ", which no thread of this block has written (uninitialised shared memory)");
    record_read(*access, name, index);
    return *value;
  }
  SharedRef& operator=(const T& v) {
    check_epoch();
    record_write(*access, name, index);
    *value = v;
    return *this;
  }
  SharedRef& operator=(const SharedRef& other) { return *this = static_cast<T>(other); }
  template <typename U>
  SharedRef& operator+=(const U& v) {
    const T current = *this;
    return *this = static_cast<T>(current + v);
  }
};

template <typename T, int64_t First, int64_t... Rest>
struct SharedIndex {
  T* data;
  Access* shadow;
  const char* name;
  int64_t offset;
  auto operator[](int64_t i) const {
    if (i < 0 || i >= First)
      fail(std::string("index ") + std::to_string(i) + " out of range [0, " + std::to_string(First) +
           ") of shared array " + name);
    constexpr int64_t stride = (int64_t{1} * ... * Rest);
    if constexpr (sizeof...(Rest) == 0) {
      return SharedRef<T>{data + offset + i, shadow + offset + i, name, offset + i, current_epoch()};
    } else {
      return SharedIndex<T, Rest...>{data, shadow, name, offset + i * stride};
    }
  }
};

template <typename T, int64_t... Dims>
struct SharedArray {
  static constexpr int64_t kSize = (int64_t{1} * ... * Dims);
  T data[kSize];
  Access shadow[kSize];
  const char* name;
  explicit SharedArray(const char* array_name) : data(), shadow(), name(array_name) {}
  auto operator[](int64_t i) { return SharedIndex<T, Dims...>{data, shadow, name, 0}[i]; }
};

}  // namespace emu

// ---- built-in variables and functions --------------------------------------------------------

#define threadIdx (::emu::self().idx)
#define blockIdx (::emu::launch_state().block_idx)
#define blockDim (::emu::launch_state().block)
#define gridDim (::emu::launch_state().grid)

// Every thread of the block must reach the same __syncthreads: arrivals from two source lines at
// one barrier are an error here (on a GPU they hang or silently pair up the wrong barriers).
// So must the threads that exited before it: CUDA defines __syncthreads only where every thread of
// the block reaches it (a GPU may count the exited ones as arrived, or hang), so a barrier after an
// early return of some of the block's threads is an error here too.
inline void emulated_syncthreads(const char* file, int line) {
  ::emu::Launch& launch = ::emu::launch_state();
  ::emu::Barrier& barrier = launch.block_barrier;
  if (barrier.expected != static_cast<int>(launch.threads.size()))
    ::emu::fail(std::string("__syncthreads at ") + file + ":" + std::to_string(line) + " after " +
                std::to_string(launch.threads.size() - barrier.expected) +
                " threads of the block returned: a barrier not every thread reaches");
  if (barrier.arrived == 0) {
    barrier.site_file = file;
    barrier.site_line = line;
  } else if (barrier.site_line != line || std::strcmp(barrier.site_file, file) != 0) {
    ::emu::fail(std::string("__syncthreads at ") + file + ":" + std::to_string(line) + " meets threads waiting at " +
                barrier.site_file + ":" + std::to_string(barrier.site_line) + ": a barrier not every thread reaches");
  }
  ::emu::arrive_and_wait(barrier);
}
#define __syncthreads() emulated_syncthreads(__FILE__, __LINE__)

// __syncthreads, and whether any thread of the block passed a non-zero predicate.
inline int emulated_syncthreads_or(int predicate, const char* file, int line) {
  ::emu::Barrier& barrier = ::emu::launch_state().block_barrier;
  const uint64_t generation = barrier.generation;
  if (predicate != 0) barrier.pending_or = true;  // (set before arriving: the last arrival finishes it)
  emulated_syncthreads(file, line);
  return barrier.finished_or[generation & 1] ? 1 : 0;
}
#define __syncthreads_or(predicate) emulated_syncthreads_or((predicate), __FILE__, __LINE__)

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  ::emu::check_full_mask(mask, "__shfl_xor_sync");
  if (width != 32) ::emu::fail("__shfl_xor_sync: only width 32 is emulated");
  const auto all = ::emu::warp_gather(value, "__shfl_xor_sync");
  const int source = ::emu::lane_of(::emu::self()) ^ lane_mask;
  return source >= 0 && source < 32 ? all[source] : value;  // out of range: the lane's own value
}

[[noreturn]] inline void __trap() { ::emu::fail("__trap()"); }

inline float __uint_as_float(unsigned bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline unsigned __float_as_uint(float f) {
  unsigned bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

inline size_t __cvta_generic_to_shared(const void* p) { return ::emu::shared_offset(p); }

// ---- the CUDA runtime calls the host code makes ----------------------------------------------

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int /*device*/) {
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: {
      const char* setting = std::getenv("ARCFACE_EMU_SM_COUNT");
      *value = setting != nullptr ? std::atoi(setting) : 132;
      return cudaSuccess;
    }
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: {
      // sm_90's 228 KB unless ARCFACE_EMU_SMEM_PER_SM says otherwise (sm_80: 167936; sm_86, sm_89
      // and sm_120: 102400). A block may opt into all of it but the 1 KB the system reserves.
      const char* setting = std::getenv("ARCFACE_EMU_SMEM_PER_SM");
      const int per_sm = setting != nullptr ? std::atoi(setting) : 233472;
      *value = attribute == cudaDevAttrMaxSharedMemoryPerBlockOptin ? per_sm - 1024 : per_sm;
      return cudaSuccess;
    }
  }
  return cudaErrorInvalidValue;
}

template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel* kernel) {
  attributes->binaryVersion = 90;
  attributes->ptxVersion = 90;
  auto found = ::emu::smem_opt_in().find(reinterpret_cast<const void*>(kernel));
  attributes->maxDynamicSharedSizeBytes = static_cast<int>(
      found != ::emu::smem_opt_in().end() ? found->second : ::emu::kDefaultDynamicSmemLimit);
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > ::emu::kMaxDynamicSmem)
    return cudaErrorInvalidValue;
  ::emu::smem_opt_in()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

// Whether the stream is capturing a CUDA graph: never, unless ARCFACE_EMU_CAPTURING=1 (read at
// every call) pretends it is, for the tests of the op's behaviour inside a capture.
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };

inline cudaError_t cudaStreamIsCapturing(cudaStream_t /*stream*/, cudaStreamCaptureStatus* status) {
  const char* setting = std::getenv("ARCFACE_EMU_CAPTURING");
  *status = setting != nullptr && std::strcmp(setting, "0") != 0 ? cudaStreamCaptureStatusActive
                                                                 : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid value";
}

// The 128 x 128 tile of x·Wᵀ on Hopper's warpgroup tensor-core instructions (wgmma, sm_90a): the
// same product as tensor_core_tile.cuh's mma.sync tile, for the fused forward's wgmma variant.
//
// Why: on the H200 (session 8) the mma.sync forward ran its GEMM at about a third of cuBLAS's rate,
// bound by latency with ~4 instructions issued for each mma. One wgmma.m64n128k16 does the work
// of 64 mma.sync.m16n8k16 (a warpgroup's 64 x 128 x 16), reads both operands from shared memory
// itself (no ldmatrix, no fragment registers) and runs asynchronously while the warps issue the
// next slice's copies.
//
// One block of 256 threads (two warpgroups) computes acc = X[row0 : row0+128, :]·W[col0 : col0+128, :]ᵀ
// over the whole depth D (the rows of both operands contiguous, D a multiple of 8, both bases 16-byte
// aligned). The depth is walked in slices through a cp.async pipeline kept running across a run of
// tiles, as TileRun does for the mma.sync tile. A stage holds the x slice (128 rows) and then the W
// slice (128 class rows) in wgmma's canonical K-major layout with a swizzle as wide as a slice's row.
// Two slice shapes (WgmmaSlice), both 96 KB of pipeline (two blocks an SM on sm_90):
//   64 deep: 128-byte rows, the 128-byte swizzle (16-byte chunk c of row r at r·128 + 16·(c ^ (r % 8)),
//            1024-byte atoms of 8 rows), 3 stages; each warpgroup waits for its slice's wgmma before
//            the next barrier (the default);
//   32 deep: 64-byte rows, the 64-byte swizzle (chunk c of row r at r·64 + 16·(c ^ (r / 2 % 4)),
//            512-byte atoms), 6 stages; one wgmma group stays in flight across the barrier, and the
//            loads run 4 slices ahead instead of 2 (ARCFACE_EXT_WGMMA=32, for measuring).
// And the resident x tile (WgmmaSlice<64, true, ...>, ARCFACE_EXT_WGMMA=resident, for measuring): a block
// of one row tile loads its x tile once, whole (D at most 512: 8 slices of 16 KB in the 64-deep slices'
// layout), and streams only W's 64-deep slices through stages of 16 KB: the forward's 5, with one
// wgmma group in flight across the barrier and each tile's epilogue run while the next tile's first
// slice is on the tensor cores (WgmmaForwardResidentSlice, WgmmaPrevious; 209 KB in all), the
// backward's 3 with the gradient tile staged beside them (211 KB); one block an SM. Why: at 128 x 128
// a streamed tile reads 256 KB from L2 for its 16.8 MFLOP at D = 512, and the H200's fused forward
// already ran its L2 at 57% of peak at a third of cuBLAS's rate (NOTES.md, session 15); with x
// resident a tile reads 128 KB. With one block an SM no other block hides the epilogue, hence the
// overlap within the block (NOTES.md, session 16).
// The stages are 1024-byte aligned. Warpgroup g multiplies x rows 64g .. 64g+63 by all 128 class rows:
// one m64n128k16 for each 16-deep step of a slice, whose descriptors differ only in their start
// address (+32 bytes a step; the hardware applies the swizzle to the address bits, as the copies did).
//
// After wgmma_run_gemm returns, thread (warpgroup g, warp q = warp % 4, lane) holds in acc[4j + 2h + e]
// the dot product of
//   row   64g + 16q + lane/4 + 8h          (h < 2)
//   class 8j + 2·(lane % 4) + e             (j < 16, e < 2)
// relative to (row0, col0) — wgmma's accumulator layout, see wgmma_tile_row / wgmma_tile_class. A row's
// 128 classes sit in the four lanes of one quad: a row's reduction takes two shuffles and no shared
// memory, where the mma.sync tile spreads a row over four warps.
//
// With kClassNorms, the loop also sums the squares of the W tile's elements as they pass through shared
// memory: thread t adds those of class t / 2, depth half t % 2 of each slice, so that norm_sq + (its
// xor-1 neighbour's) is ‖w_{col0 + t/2}‖² (publish_class_norms), as with the mma.sync tile (with
// 32-deep slices, in the same order as the mma.sync tile's sums).
//
// Built for sm_90a only (TORCH_CUDA_ARCH_LIST with 9.0a; setup.py then defines ARCFACE_EXT_SM90A and the
// host may choose this tile). Compiled for any other target, the primitives trap. With
// ARCFACE_EXT_EMULATE (tests/emulator) they call the emulator's wgmma, which reads the operands through
// the same descriptors and swizzle.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "tensor_core_tile.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ARCFACE_EXT_WGMMA_DEVICE 1
#endif

namespace arcface_ext {
namespace cuda {

// A slice's shape and its pipeline (see the top of the file). With kResidentX the x tile is loaded once,
// whole, and only W's slices stream through the stages (4, or kStages), with kInFlight wgmma groups
// across the barrier (0 unless given).
template <int kDepth, bool kResidentX = false, int kStages = 0, int kInFlight = -1>
struct WgmmaSlice {
  static_assert(kDepth == 64 || kDepth == 32, "64- or 32-deep slices");
  static_assert(!kResidentX || kDepth == 64, "the resident x tile takes 64-deep slices");
  static_assert((kStages == 0 && kInFlight < 0) || kResidentX, "stages and groups in flight for the resident tile only");
  static constexpr int depth = kDepth;
  static constexpr bool resident_x = kResidentX;
  static constexpr uint32_t row_bytes = 2 * kDepth;                   // the swizzle's width
  static constexpr int stages = kResidentX ? (kStages != 0 ? kStages : 4) : kDepth == 64 ? 3 : 6;
  static constexpr int in_flight = kInFlight >= 0 ? kInFlight : kDepth == 64 ? 0 : 1;  // wgmma groups across the barrier
  static constexpr int ahead = stages - 1 - in_flight;                // slices loaded ahead
  static_assert(ahead >= 1 && in_flight <= 1, "a slice loaded ahead; at most one group in flight");
  static constexpr uint32_t operand_bytes = kTileRows * row_bytes;    // x or W
  static constexpr uint32_t w_offset = kResidentX ? 0 : operand_bytes;  // W's slice in a stage
  static constexpr uint32_t stage_bytes = w_offset + operand_bytes;
  static constexpr uint32_t chunks = row_bytes / 16;                  // 16-byte chunks a row
  static constexpr int rows_a_pass = kTileThreads / chunks;           // rows one load covers
  static constexpr int passes = kTileRows / rows_a_pass;              // loads a thread, an operand
  static constexpr uint64_t layout = kDepth == 64 ? 1 : 2;            // descriptor: 128- or 64-byte swizzle
  // The swizzled chunk of chunk c in row r: c XOR the row's address bits 7 and up.
  __device__ __forceinline__ static uint32_t chunk_at(uint32_t r, uint32_t c) {
    return c ^ ((r * row_bytes >> 7) & (chunks - 1));
  }
};
static_assert(kTileRows == kTileClasses, "one operand size for x and W");
// The stages start at a 1024-byte boundary (the swizzle atom); the dynamic shared memory the runtime
// gives is 16-byte aligned, so the kernels ask for 1 KB more and round their base up. Both slice shapes
// take the same: 96 KB of stages.
constexpr int wgmma_smem_bytes() { return 3 * WgmmaSlice<64>::stage_bytes + 1024; }
static_assert(6 * WgmmaSlice<32>::stage_bytes + 1024 == wgmma_smem_bytes(), "both pipelines alike");
constexpr uint32_t kWgmmaPipelineBytes = 3 * WgmmaSlice<64>::stage_bytes;

// The tile variants (the host's ARCFACE_EXT_WGMMA): 64 or 32 for streaming slices of that depth, and
// kWgmmaResidentX for the resident x tile, whose whole depth, at most kWgmmaResidentMaxDim, sits in
// shared memory before the W stages (the kernels' dynamic shared memory: kWgmmaResidentSmemBytes, one
// block an SM).
constexpr int kWgmmaResidentX = 1;
// The resident forward's: 5 W stages (209 KB in all), one group in flight across the barrier, 3 slices
// loaded ahead, so that the previous tile's epilogue runs while this tile's first slice is on the
// tensor cores and the next three stream in (wgmma_run_gemm with a WgmmaPrevious).
using WgmmaForwardResidentSlice = WgmmaSlice<64, true, 5, 1>;
template <int kVariant>
using WgmmaSliceOf = std::conditional_t<kVariant == kWgmmaResidentX, WgmmaForwardResidentSlice, WgmmaSlice<kVariant>>;
constexpr int kWgmmaResidentMaxDim = 512;
// A resident tile's dynamic shared memory, whatever D (so that the opt-in attribute never shrinks):
// the x tile at its largest, the stages, `extra` bytes after them, and the 1 KB of alignment slack.
template <typename Slice>
constexpr int wgmma_resident_smem_bytes(int extra = 0) {
  return (kWgmmaResidentMaxDim / Slice::depth) * Slice::operand_bytes + Slice::stages * Slice::stage_bytes + extra +
         1024;
}
constexpr int kWgmmaResidentSmemBytes = wgmma_resident_smem_bytes<WgmmaSliceOf<kWgmmaResidentX>>();
template <int kVariant>
constexpr int wgmma_variant_smem_bytes() {
  return kVariant == kWgmmaResidentX ? kWgmmaResidentSmemBytes : wgmma_smem_bytes();
}
// The backward's resident tile: 3 W stages, and after them the gradient tile staged for its copy-out
// (kWgmmaStagedBytes: 128 rows of 136 values, 16-byte aligned rows), 211 KB in all.
using WgmmaBackwardResidentSlice = WgmmaSlice<64, true, 3>;
constexpr int kWgmmaStagedBytes = kTileRows * (kTileClasses + 8) * 2;
constexpr int kWgmmaBackwardResidentSmemBytes = wgmma_resident_smem_bytes<WgmmaBackwardResidentSlice>(kWgmmaStagedBytes);

using WgmmaAcc = float[64];

// The backward's class-outer tile (fused_weight_gradient_wgmma_kernel, bf16, D up to
// kWgmmaResidentMaxDim): a block's 64 classes with their W rows resident, two 64-row x tiles used in
// turn (the next one loading while this one is multiplied), each as eight 64-deep slices of 8 KB in the
// 128-byte swizzle, and the block's 64 x 64 gradient tile staged as an A operand (8 KB): 201 KB with the
// alignment slack, one block an SM.
constexpr int kOuterClasses = 64;
constexpr int kOuterRows = 64;
constexpr uint32_t kOuterSliceBytes = 64 * 128;
constexpr uint32_t kOuterTileBytes = (kWgmmaResidentMaxDim / 64) * kOuterSliceBytes;
constexpr int kOuterSmemBytes = 3 * kOuterTileBytes + kOuterSliceBytes + 1024;

// Where a kernel's tile lives in its dynamic shared memory: from the first 1024-byte boundary (the
// swizzle's atom; wgmma_variant_smem_bytes has the room), the resident x tile if the slice has one
// (x_base), then the pipeline's stages (base, and `stages` the same memory as a pointer).
struct WgmmaSmem {
  uint32_t x_base;
  uint32_t base;
  uint16_t* stages;
};

template <typename Slice>
__device__ __forceinline__ WgmmaSmem wgmma_smem(uint16_t* smem, int dim) {
  const uint32_t raw = shared_address(smem);
  const uint32_t x_base = (raw + 1023u) & ~1023u;
  const uint32_t resident = Slice::resident_x ? (dim + Slice::depth - 1) / Slice::depth * Slice::operand_bytes : 0;
  return {x_base, x_base + resident, smem + (x_base + resident - raw) / 2};
}

__device__ __forceinline__ int wgmma_tile_row(int h) {
  return (threadIdx.x / 128) * 64 + (threadIdx.x / 32 % 4) * 16 + (threadIdx.x % 32) / 4 + 8 * h;
}

__device__ __forceinline__ int wgmma_tile_class(int j, int e) { return 8 * j + 2 * (threadIdx.x % 4) + e; }

// A shared-memory matrix descriptor for a K-major operand of the slice's shape: start address,
// leading byte offset 16 (unused by the swizzled layouts), stride 8 rows between 8-row groups, base
// offset 0 (the atoms aligned), swizzle mode 1 (128 bytes) or 2 (64 bytes).
template <typename Slice>
__device__ __forceinline__ uint64_t wgmma_descriptor(uint32_t address) {
  return uint64_t{(address >> 4) & 0x3fffu} | (uint64_t{1} << 16) | (uint64_t{8 * Slice::row_bytes >> 4} << 32) |
         (Slice::layout << 62);
}

// Orders this thread's generic-proxy writes to shared memory (its landed cp.async copies) before
// later reads by the async proxy (wgmma); each writer runs it before the barrier the readers pass.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(ARCFACE_EXT_WGMMA_DEVICE)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(ARCFACE_EXT_EMULATE)
  ::emu::fence_proxy_async();
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(ARCFACE_EXT_WGMMA_DEVICE)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if defined(ARCFACE_EXT_WGMMA_DEVICE)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(ARCFACE_EXT_EMULATE)
  ::emu::wgmma_commit();
#endif
}

// Pins the accumulators at this point of the instruction stream: no access to them moves across it
// (the compiler sees the wgmma asm, not the fences and waits, as their readers and writers).
template <int kRegisters>
__device__ __forceinline__ void wgmma_pin(float (&d)[kRegisters]) {
#if defined(ARCFACE_EXT_WGMMA_DEVICE)
#pragma unroll
  for (int i = 0; i < kRegisters; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

// Waits until at most kPending of the wgmma groups this thread's warpgroup committed are still running,
// then pins the accumulators (every array a group in flight may write): the compiler must not read
// them before the wait.
template <int kPending, typename... Accs>
__device__ __forceinline__ void wgmma_wait(Accs&... d) {
#if defined(ARCFACE_EXT_WGMMA_DEVICE)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
  (wgmma_pin(d), ...);
#elif defined(__CUDA_ARCH__)
  ((void)d, ...);
  __trap();
#elif defined(ARCFACE_EXT_EMULATE)
  ((void)d, ...);
  ::emu::wgmma_wait(kPending);
#endif
}

#define ARCFACE_EXT_WGMMA_D                                                                                 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "   \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, " \
  "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define ARCFACE_EXT_WGMMA_D_OPERANDS                                                                       \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),          \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),           \
      "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),           \
      "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),           \
      "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),           \
      "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),           \
      "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]),           \
      "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// d = A·Bᵀ (+ d with `accumulate`) over 16 depth elements, asynchronously (complete after wgmma_commit
// and a wgmma_wait that covers its group): A the warpgroup's 64 x rows, B the 128 class rows, both
// K-major in shared memory (descriptors). Without `accumulate` (scale-d 0) the old d is not read, so a
// tile's first step needs no zeros written into the accumulators first: ptxas serialises a wgmma
// pipeline where other instructions write accumulators while groups are in flight.
template <bool kBFloat16>
__device__ __forceinline__ void wgmma_m64n128k16(WgmmaAcc& d, uint64_t desc_a, uint64_t desc_b, bool accumulate) {
#if defined(ARCFACE_EXT_WGMMA_DEVICE)
  if constexpr (kBFloat16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ARCFACE_EXT_WGMMA_D ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : ARCFACE_EXT_WGMMA_D_OPERANDS
        : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " ARCFACE_EXT_WGMMA_D ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : ARCFACE_EXT_WGMMA_D_OPERANDS
        : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
  }
#elif defined(__CUDA_ARCH__)
  (void)d;
  (void)desc_a;
  (void)desc_b;
  (void)accumulate;
  __trap();
#elif defined(ARCFACE_EXT_EMULATE)
  ::emu::wgmma_m64n128k16(d, desc_a, desc_b, kBFloat16, accumulate);
#endif
}

// The backward's class-outer tile's two shapes (fused_weight_gradient_wgmma_kernel, bf16): S = W_tile·x_rowsᵀ,
// 64 classes by a warpgroup's 32 rows (kN 32: m64n32k16, both operands K-major), and P += G·x_rows, 64
// classes by 256 depth columns over 16 rows (kN 256: m64n256k16 with B MN-major, imm-trans-b 1: the x tile
// read along its depth). Same accumulator layout as above, j < kN/8; same scale-d.
template <int kN>
__device__ __forceinline__ void wgmma_m64nNk16_bf16(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b,
                                                    bool accumulate) {
  static_assert(kN == 32 || kN == 256, "the class-outer tile's shapes");
#if defined(ARCFACE_EXT_WGMMA_DEVICE)
  if constexpr (kN == 32) {
    asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
          "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
          "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
            "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),
            "+f"(d[15])
          : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
  } else {
    asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
          "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "
          "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "
          "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "
          "%59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, "
          "%78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, "
          "%97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, "
          "%113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
          "}, %128, %129, p, 1, 1, 0, 1;\n}\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
            "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),
            "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),
            "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),
            "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
            "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),
            "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
            "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
            "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
            "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]),
            "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]),
            "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]),
            "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]),
            "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]),
            "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]),
            "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]),
            "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
            "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]),
            "+f"(d[127])
          : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
  }
#elif defined(__CUDA_ARCH__)
  (void)d;
  (void)desc_a;
  (void)desc_b;
  (void)accumulate;
  __trap();
#elif defined(ARCFACE_EXT_EMULATE)
  ::emu::wgmma_issue(d, kN, /*b_mn=*/kN == 256, desc_a, desc_b, true, accumulate);
#endif
}

// A descriptor for an MN-major operand in the 128-byte swizzle (CUTLASS's canonical ((64, m), (8, k)) :
// ((1, LBO), (64, SBO)) in values): each 128-byte row of an atom holds 64 consecutive MN values at one
// depth k, its 8 rows 8 consecutive k; the next 64 MN values `leading` bytes on (LBO), the next 8 k
// 1024 bytes on (SBO). The start is an atom's.
__device__ __forceinline__ uint64_t wgmma_descriptor_mn(uint32_t address, uint32_t leading) {
  return uint64_t{(address >> 4) & 0x3fffu} | (uint64_t{(leading >> 4) & 0x3fffu} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

#undef ARCFACE_EXT_WGMMA_D
#undef ARCFACE_EXT_WGMMA_D_OPERANDS

// Where the pipeline's next load goes (the wgmma twin of TileRunCursor, whose TileRun it walks with
// the slice's depth: make_wgmma_run). Thread t copies the 16-byte chunk c = t % chunks of rows
// r = t / chunks + rows_a_pass·u (u < passes) of both operands; all its rows have the same swizzle key,
// so its chunk lands at the same swizzled column of every row, and its shared addresses are one base
// plus immediates.
template <typename Slice>
struct WgmmaRunCursor {
  int64_t tile;
  int64_t class_tile;     // tile % tiles_per_pass
  int64_t pass_row0;      // row0 + 128·(tile / tiles_per_pass)
  int slice;
  int stage;
  uint32_t dst;           // the shared address of this thread's first x chunk in `stage`
  const uint16_t* x_src;  // x row pass_row0 + t/chunks, column slice·depth + 8c
  const uint16_t* w_src;  // class row col0 + 128·class_tile + t/chunks, column slice·depth + 8c
  int depth_left;         // dim - (slice·depth + 8c): this thread's chunks of the slice exist while > 0
  bool x_ok[Slice::passes];
  bool w_ok[Slice::passes];

  __device__ __forceinline__ void aim_at_rows(const TileRun& run) {
    const int64_t first = pass_row0 + threadIdx.x / Slice::chunks;
#pragma unroll
    for (int u = 0; u < Slice::passes; ++u) x_ok[u] = first + Slice::rows_a_pass * u < run.rows;
    x_src = run.x + (x_ok[0] ? first * run.dim + (threadIdx.x % Slice::chunks) * 8 : 0);
  }

  __device__ __forceinline__ void aim_at_tile(const TileRun& run) {
    const int64_t first = run.col0 + class_tile * kTileClasses + threadIdx.x / Slice::chunks;
#pragma unroll
    for (int u = 0; u < Slice::passes; ++u) w_ok[u] = first + Slice::rows_a_pass * u < run.classes;
    w_src = run.w + (w_ok[0] ? first * run.dim + (threadIdx.x % Slice::chunks) * 8 : 0);
  }

  // At slice 0 of tile t, stage `stage_of_t`; `base` the pipeline's (1024-aligned) shared address.
  __device__ __forceinline__ void start(const TileRun& run, int64_t t, int stage_of_t, uint32_t base) {
    tile = t;
    const uint32_t r = threadIdx.x / Slice::chunks, c = threadIdx.x % Slice::chunks;
    dst = base + stage_of_t * Slice::stage_bytes + r * Slice::row_bytes + 16 * Slice::chunk_at(r, c);
    const int64_t pass = t / run.tiles_per_pass;
    class_tile = t - pass * run.tiles_per_pass;
    pass_row0 = run.row0 + pass * kTileRows;
    slice = 0;
    stage = stage_of_t;
    depth_left = run.dim - static_cast<int>(c) * 8;
    aim_at_rows(run);
    aim_at_tile(run);
  }

  __device__ __forceinline__ void advance(const TileRun& run) {
    dst += Slice::stage_bytes;
    if (++stage == Slice::stages) {
      stage = 0;
      dst -= Slice::stages * Slice::stage_bytes;
    }
    if (++slice == run.slices) {
      slice = 0;
      ++tile;
      depth_left += (run.slices - 1) * Slice::depth;
      if (++class_tile == run.tiles_per_pass) {
        class_tile = 0;
        pass_row0 += kTileRows;
        aim_at_rows(run);
      } else {
        x_src -= (run.slices - 1) * Slice::depth;
      }
      aim_at_tile(run);
    } else {
      x_src += Slice::depth;
      w_src += Slice::depth;
      depth_left -= Slice::depth;
    }
  }
};

// A run of tiles walked in the slice's depth (see TileRun).
template <typename Slice>
__device__ __forceinline__ TileRun make_wgmma_run(const uint16_t* __restrict__ x, int64_t rows, int64_t row0,
                                                  const uint16_t* __restrict__ w, int64_t classes, int64_t col0,
                                                  int64_t tiles_per_pass, int dim, int64_t passes) {
  return {x, rows, row0, w, classes, col0, passes * tiles_per_pass, tiles_per_pass, dim,
          (dim + Slice::depth - 1) / Slice::depth};
}

// Issues the cursor's slice (nothing past the run's end; W's only with a resident x tile) and commits
// one group either way. Rows and depth past the ends load as zeros, from no address.
template <typename Slice>
__device__ __forceinline__ void wgmma_run_load(const TileRun& run, const WgmmaRunCursor<Slice>& at) {
  if (at.tile < run.tiles) {
    const bool in_depth = at.depth_left > 0;
    const int64_t row_step = int64_t{Slice::rows_a_pass} * run.dim;
    constexpr uint32_t kRowStepBytes = Slice::rows_a_pass * Slice::row_bytes;
#pragma unroll
    for (int u = 0; u < Slice::passes; ++u) {
      if constexpr (!Slice::resident_x) {
        const bool x_ok = in_depth && at.x_ok[u];
        cp_async_16(at.dst + u * kRowStepBytes, x_ok ? at.x_src + u * row_step : run.x, x_ok);
      }
      const bool w_ok = in_depth && at.w_ok[u];
      cp_async_16(at.dst + Slice::w_offset + u * kRowStepBytes, w_ok ? at.w_src + u * row_step : run.w, w_ok);
    }
  }
  cp_async_commit();
}

// The resident x tile: rows run.row0 .. +127 over the whole depth, slice s at x_base + s·operand_bytes in
// the slices' swizzled layout (zeros past the rows and the depth), uncommitted: the caller's next
// commit takes these copies into its group. One pass only (the rows never change).
template <typename Slice>
__device__ __forceinline__ void wgmma_load_resident_x(const TileRun& run, uint32_t x_base) {
  static_assert(Slice::resident_x, "the resident tile's slices");
  const uint32_t r = threadIdx.x / Slice::chunks, c = threadIdx.x % Slice::chunks;
  const uint32_t dst = x_base + r * Slice::row_bytes + 16 * Slice::chunk_at(r, c);
  const int64_t first = run.row0 + r;
#pragma unroll 1
  for (int slice = 0; slice < run.slices; ++slice) {
    const bool in_depth = slice * Slice::depth + static_cast<int>(c) * 8 < run.dim;
#pragma unroll
    for (int u = 0; u < Slice::passes; ++u) {
      const int64_t row = first + Slice::rows_a_pass * u;
      const bool ok = in_depth && row < run.rows;
      cp_async_16(dst + slice * Slice::operand_bytes + u * Slice::rows_a_pass * Slice::row_bytes,
                  ok ? run.x + row * run.dim + slice * Slice::depth + c * 8 : run.x, ok);
    }
  }
}

// No previous tile to finish (wgmma_run_gemm's default).
struct WgmmaNoPrevious {};

// The previous tile of a run, to be finished while this one's first slice is on the tensor cores:
// its accumulators (the other array of the pair the caller alternates) and what finishes it.
template <typename Finish>
struct WgmmaPrevious {
  WgmmaAcc& acc;
  Finish& finish;
};

template <typename Finish>
__device__ __forceinline__ WgmmaPrevious<Finish> wgmma_previous(WgmmaAcc& acc, Finish& finish) {
  return {acc, finish};
}

// acc = X[r0 : r0+128, :]·W[c0 : c0+128, :]ᵀ for tile t of the run (see the top of the file). Every
// thread of the block calls it for t = 0, 1, ... in order; `base` is the pipeline's 1024-aligned
// shared address and `stages` the same memory as a pointer. Between two calls the caller must not
// touch the pipeline. After the run's last tile every copy has landed and every wgmma completed.
// With a resident x tile (Slice::resident_x: a run of one pass), x_base is its 1024-aligned shared
// address, slices · operand_bytes of room; tile 0 loads it with the first W slice.
//
// With a WgmmaPrevious (Slice::in_flight 1) the tile's last group stays in flight when it returns.
// The next call waits for it just before it issues its own first slice, and once that slice's copies
// for later slices are on their way calls previous.finish() (all threads, no pipeline barrier
// pending: it may synchronise the block): the previous tile's epilogue runs while this tile's first
// slice is on the tensor cores and the next slices load. The caller alternates two accumulator arrays
// (acc this tile's, previous.acc the last's) and gives the epilogue registers of its own (a copy):
// ptxas serialises the pipeline if other instructions write a wgmma's accumulator registers while a
// group is in flight. The run's last group the caller retires itself (wgmma_wait<0> on both arrays)
// before it finishes the last tile. Without a WgmmaPrevious every tile returns complete.
//
// ptxas also serialises a pipeline (the C75xx advisories, an error in .ci/compile_cuda.sh) where it
// cannot see that no other instruction touches the accumulators of a group in flight. Hence the slice
// loop's shape: the first slice peeled (its first step's scale-d 0 a constant, not a select on the
// accumulators), every wait a constant count right after a commit, and the previous tile's last group
// retired before this tile's first is issued, so that during previous.finish() the one group in flight
// is this tile's and writes acc alone.
template <bool kBFloat16, bool kClassNorms, typename Slice, typename Previous = WgmmaNoPrevious>
__device__ __forceinline__ void wgmma_run_gemm(const TileRun& run, int64_t t, uint32_t base, const uint16_t* stages,
                                               WgmmaAcc& acc, float& norm_sq, uint32_t x_base = 0,
                                               Previous previous = {}) {
  constexpr bool kOverlap = !std::is_same<Previous, WgmmaNoPrevious>::value;
  static_assert(!kOverlap || Slice::in_flight == 1, "a previous tile to finish needs a group in flight");
  // Every accumulator array a group in flight may write: pinned at each wait and before each fence.
  auto wait = [&](auto pending) {
    if constexpr (kOverlap) {
      wgmma_wait<decltype(pending)::value>(acc, previous.acc);
    } else {
      wgmma_wait<decltype(pending)::value>(acc);
    }
  };
  norm_sq = 0.0f;
  // Slice g of the run (g = t·slices + slice) lands in stage g % stages; the load issued at slice g
  // is slice g + ahead, the prologue's are 0 .. ahead - 1.
  int stage = static_cast<int>(t * run.slices % Slice::stages);
  WgmmaRunCursor<Slice> next;
  next.start(run, t, stage, base);
  if (t == 0) {
    if constexpr (Slice::resident_x) wgmma_load_resident_x<Slice>(run, x_base);
#pragma unroll 1
    for (int g = 0; g < Slice::ahead; ++g) {
      wgmma_run_load(run, next);
      next.advance(run);
    }
  } else {
#pragma unroll 1
    for (int g = 0; g < Slice::ahead; ++g) next.advance(run);
  }
  const uint32_t a_offset = (threadIdx.x / 128) * 64 * Slice::row_bytes;  // this warpgroup's 64 x rows
  // The class norms: class t/2's chunks of depth half t % 2, at their swizzled columns (elements).
  const uint32_t norm_class = threadIdx.x / 2;
  const uint32_t norm_row = Slice::w_offset / 2 + norm_class * (Slice::row_bytes / 2);
  auto run_slice = [&](int slice, auto first) {
    // Groups committed so far: ahead + g; at most ahead - 1 pending, so slice g has landed. The fence
    // hands this thread's copies to the async proxy before the barrier. Past the barrier, every
    // warpgroup has waited out its wgmma of slice g - 1 - in_flight, whose stage the load below
    // refills (slice g + ahead = g - 1 - in_flight + stages).
    cp_async_wait<Slice::ahead - 1>();
    fence_proxy_async();
    __syncthreads();
    const uint32_t stage_address = base + stage * Slice::stage_bytes;
    if (++stage == Slice::stages) stage = 0;
    // The accumulators' last ordinary accesses (the previous epilogue's) before the fence, as
    // wgmma.fence requires.
    wgmma_pin(acc);
    if constexpr (kOverlap) {
      // The previous tile's last group, retired before this tile's first is issued: ptxas then sees
      // that the one group in flight during previous.finish() writes acc alone.
      if constexpr (decltype(first)::value) wait(std::integral_constant<int, 0>{});
      wgmma_pin(previous.acc);
    }
    wgmma_fence();
    const uint32_t a_address = Slice::resident_x ? x_base + slice * Slice::operand_bytes : stage_address;
#pragma unroll
    for (int kk = 0; kk < Slice::depth / 16; ++kk) {
      wgmma_m64n128k16<kBFloat16>(acc, wgmma_descriptor<Slice>(a_address + a_offset + 32 * kk),
                                  wgmma_descriptor<Slice>(stage_address + Slice::w_offset + 32 * kk),
                                  !(decltype(first)::value && kk == 0));
    }
    wgmma_commit();
    // The earlier groups: the previous slice's, or at a tile's first slice the previous tile's last.
    if constexpr (Slice::in_flight == 1) wait(std::integral_constant<int, 1>{});
    // While the tensor cores work: the next slice's copies, and this slice's class norms.
    wgmma_run_load(run, next);
    next.advance(run);
    if constexpr (kClassNorms) {
      const uint16_t* stage_elems = stages + (stage_address - base) / 2;
      float sum = 0.0f;
#pragma unroll
      for (uint32_t v = 0; v < Slice::chunks / 2; ++v) {
        const uint32_t chunk = Slice::chunk_at(norm_class, (Slice::chunks / 2) * (threadIdx.x % 2) + v);
        sum = sum_squares_8<kBFloat16>(stage_elems + norm_row + 8 * chunk, sum);
      }
      norm_sq += sum;  // past the ends the slice holds zeros, which add nothing
    }
    if constexpr (Slice::in_flight == 0) wait(std::integral_constant<int, 0>{});
    // The previous tile (retired before this slice was issued), finished once the copies are on their way.
    if constexpr (kOverlap) {
      if constexpr (decltype(first)::value) {
        if (t > 0) previous.finish();
      }
    }
  };
  run_slice(0, std::true_type{});
  for (int slice = 1; slice < run.slices; ++slice) run_slice(slice, std::false_type{});
  if constexpr (!kOverlap && Slice::in_flight != 0) wait(std::integral_constant<int, 0>{});
  if (t + 1 == run.tiles) {
    cp_async_wait<0>();
    __syncthreads();
  }
}

// The backward's class-outer tile (kOuterClasses above; fused_weight_gradient_wgmma_kernel and its probe).
// A tile holds 64 rows of a matrix whose rows are D values deep, as 64-deep slices of 64 rows (8 KB, the
// 128-byte swizzle, kOuterSliceBytes apart): W's 64 classes, an x tile's 64 rows, or (one slice) the
// staged 64 x 64 gradient tile, its rows classes and its depth x rows.

// The element offset of (row r, depth k) in such a tile.
__device__ __forceinline__ uint32_t outer_element(int r, int k) {
  return (k / 64) * (kOuterSliceBytes / 2) + r * 64 + 8 * ((k % 64 / 8) ^ (r % 8)) + k % 8;
}

// Rows [first, first + 64) of a (count, dim) 16-bit matrix into the tile at dst, `slices` slices, zeros
// past the rows and the depth (dim a multiple of 8), uncommitted: thread t copies chunk t % 8 of rows
// t / 8 and t / 8 + 32 (one swizzle key for both).
__device__ __forceinline__ void outer_load_tile(uint32_t dst, const uint16_t* __restrict__ src, int64_t first,
                                                int64_t count, int dim, int slices) {
  const int r = threadIdx.x / 8, c = threadIdx.x % 8;
#pragma unroll 1
  for (int slice = 0; slice < slices; ++slice) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int row = r + 32 * u;
      const bool ok = first + row < count && 64 * slice + 8 * c < dim;
      cp_async_16(dst + slice * kOuterSliceBytes + row * 128 + 16 * (c ^ (row % 8)),
                  ok ? src + (first + row) * dim + 64 * slice + 8 * c : src, ok);
    }
  }
}

// Issues (uncommitted) S = W·Xᵀ over `slices` slices: A the 64 classes at w_tile, B this warpgroup's 32
// rows of the x tile (32g .. +31), both K-major; acc_s[4j + 2h + e] then holds class
// 16·(warp % 4) + lane/4 + 8h, row 32g + 8j + 2·(lane % 4) + e.
__device__ __forceinline__ void outer_issue_s(float (&acc_s)[16], uint32_t w_tile, uint32_t x_tile, int slices) {
  using Slice = WgmmaSlice<64>;
  const uint32_t rows = x_tile + 4096 * (threadIdx.x / 128);
#pragma unroll 1
  for (int slice = 0; slice < slices; ++slice) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t offset = slice * kOuterSliceBytes + 32 * kk;
      wgmma_m64nNk16_bf16<32>(acc_s, wgmma_descriptor<Slice>(w_tile + offset),
                              wgmma_descriptor<Slice>(rows + offset), slice != 0 || kk != 0);
    }
  }
}

// Issues (uncommitted) P (+= with `accumulate`) G·X over the x tile's 64 rows: A the staged 64 x 64 tile
// (K-major: its depth the rows), B the x tile read along its depth (MN-major: 64 depth columns a slice,
// kOuterSliceBytes apart), this warpgroup's depth columns 256g .. +255; acc_p[4j + 2h + e] then holds
// class 16·(warp % 4) + lane/4 + 8h, depth column 256g + 8j + 2·(lane % 4) + e.
__device__ __forceinline__ void outer_issue_p(float (&acc_p)[128], uint32_t staged, uint32_t x_tile, bool accumulate) {
  using Slice = WgmmaSlice<64>;
  const uint32_t columns = x_tile + 4 * (threadIdx.x / 128) * kOuterSliceBytes;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    wgmma_m64nNk16_bf16<256>(acc_p, wgmma_descriptor<Slice>(staged + 32 * kk),
                             wgmma_descriptor_mn(columns + 2048 * kk, kOuterSliceBytes), accumulate || kk != 0);
  }
}

}  // namespace cuda
}  // namespace arcface_ext

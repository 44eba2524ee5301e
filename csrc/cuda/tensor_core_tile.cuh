// A 128 x 128 tile of x·Wᵀ on tensor cores (sm_80+), for 16-bit inputs with fp32 accumulation:
// the building block of the fused kernels, which consume the tile in registers and never write
// the cosines to global memory.
//
// One block of 8 warps computes acc = X[row0 : row0+128, :] · W[col0 : col0+128, :]ᵀ over the
// whole depth D (the rows of both operands are contiguous, D a multiple of 8 and both bases
// 16-byte aligned, so every global load is one 16-byte cp.async). The depth is walked in 32-wide
// slices through a kStages-deep cp.async pipeline (3 to 5 stages; the host picks, see
// fused_tile_stages), kept running across a run of class tiles (TileRun);
// each warp owns a 64 x 32 sub-tile and issues mma.sync.m16n8k16 from ldmatrix fragments. Rows and
// classes past the ends load as zeros.
//
// With kClassNorms, tile_gemm also sums the squares of the W tile's elements as they pass through
// shared memory: thread t adds those of class t / 2, depth half t % 2 of each slice, so that
// norm_sq + (its xor-1 neighbour's) is ‖w_{col0 + t/2}‖², in the same order whatever the caller.
//
// After tile_gemm returns, thread (warp, lane) holds in acc[mi][ni][2h + e] the dot product of
//   row   warp_m·64 + mi·16 + lane/4 + 8h      (warp_m = warp / 4, mi < 4, h < 2)
//   class warp_n·32 + ni·8 + 2·(lane % 4) + e  (warp_n = warp % 4, ni < 4, e < 2)
// relative to (row0, col0) — the mma accumulator layout, see tile_row / tile_class.
//
// With ARCFACE_EXT_EMULATE (tests/emulator, a host build of the kernels for CI), the five PTX
// primitives below call the emulator's implementations of the same instructions instead.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace arcface_ext {
namespace cuda {

constexpr int kTileRows = 128;
constexpr int kTileClasses = 128;
constexpr int kTileDepth = 32;
constexpr int kTileThreads = 256;
constexpr int kMinTileStages = 3;
constexpr int kMaxTileStages = 5;
static_assert(kTileThreads == 2 * kTileClasses && kTileDepth == 32, "class norms: 2 threads a class, 16 values each");
// 16-bit elements per shared-memory row: 32 + 8 of padding (80 bytes), so the eight 16-byte rows
// an ldmatrix reads fall in eight different bank groups.
constexpr int kTilePitch = kTileDepth + 8;
constexpr int kTileStageElems = (kTileRows + kTileClasses) * kTilePitch;
// Dynamic shared memory of a kStages-deep pipeline: 20,480 bytes a stage (61,440 for 3, which fits
// two blocks an SM on sm_80 and sm_90; 81,920 for 4 and 102,400 for 5 fit two on sm_90 only).
constexpr int tile_smem_bytes(int stages) { return stages * kTileStageElems * 2; }

using TileAcc = float[4][4][4];

__device__ __forceinline__ int tile_row(int mi, int h) {
  return (threadIdx.x / 32 / 4) * 64 + mi * 16 + (threadIdx.x % 32) / 4 + 8 * h;
}

__device__ __forceinline__ int tile_class(int ni, int e) {
  return (threadIdx.x / 32 % 4) * 32 + ni * 8 + 2 * (threadIdx.x % 4) + e;
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers; zero-filled when !valid (the
// source is then not read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();  // built for an older target (JIT from older PTX): never a silent zero tile
#elif defined(ARCFACE_EXT_EMULATE)
  ::emu::cp_async_16(dst, src, valid);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(ARCFACE_EXT_EMULATE)
  ::emu::cp_async_commit();
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#elif defined(ARCFACE_EXT_EMULATE)
  ::emu::cp_async_wait(kPending);
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(ARCFACE_EXT_EMULATE)
  ::emu::ldmatrix_x4(r, address);
#endif
}

// d += a·b for one m16n8k16 fragment triple, bf16 or fp16 inputs, fp32 accumulators.
template <bool kBFloat16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBFloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(ARCFACE_EXT_EMULATE)
  ::emu::mma_16816(d, a, b, kBFloat16);
#endif
}

// The two 16-bit values packed in a 32-bit word, as floats.
template <bool kBFloat16>
__device__ __forceinline__ float2 unpack_pair(uint32_t word) {
  if constexpr (kBFloat16) {
    return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
  } else {
    __half2 pair;
    static_assert(sizeof(pair) == sizeof(word), "half2 is a 32-bit word");
    memcpy(&pair, &word, sizeof(word));
    return __half22float2(pair);
  }
}

// The sum of the squares of 16 consecutive 16-bit values (two 16-byte shared-memory vectors); a
// slice's partial sum is added to the running one once, which keeps the rounding error of a long
// depth down (D/32 additions in a row instead of D/2).
template <bool kBFloat16>
__device__ __forceinline__ float sum_squares_16(const uint16_t* p) {
  float sum = 0.0f;
#pragma unroll
  for (int v = 0; v < 2; ++v) {
    const uint4 words = *reinterpret_cast<const uint4*>(p + 8 * v);
    const uint32_t w4[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 f = unpack_pair<kBFloat16>(w4[q]);
      sum = fmaf(f.x, f.x, sum);
      sum = fmaf(f.y, f.y, sum);
    }
  }
  return sum;
}

// Issues the cp.asyncs of depth slice `slice` into pipeline stage `stage`: 128 rows of x and 128
// rows of W, 4 vectors of 8 elements each, two of each per thread.
__device__ __forceinline__ void tile_load_slice(const uint16_t* __restrict__ x, int64_t rows, int64_t row0,
                                                const uint16_t* __restrict__ w, int64_t classes,
                                                int64_t col0, int dim, uint16_t* smem, int stage,
                                                int slice) {
  uint16_t* sx = smem + stage * kTileStageElems;
  uint16_t* sw = sx + kTileRows * kTilePitch;
  const int k0 = slice * kTileDepth;
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int v = threadIdx.x + u * kTileThreads;
    const int r = v / 4;
    const int k = (v % 4) * 8;
    const bool in_depth = k0 + k < dim;
    const bool x_ok = in_depth && row0 + r < rows;
    const bool w_ok = in_depth && col0 + r < classes;
    cp_async_16(shared_address(sx + r * kTilePitch + k), x_ok ? x + (row0 + r) * dim + k0 + k : x, x_ok);
    cp_async_16(shared_address(sw + r * kTilePitch + k), w_ok ? w + (col0 + r) * dim + k0 + k : w, w_ok);
  }
}

// A run of consecutive class tiles [col0, col0 + 128·tiles) against one row tile, streamed through
// one kStages-deep cp.async pipeline. Depth slice g of the run (tile g / slices, slice
// g % slices) lands in stage g % kStages, and the loads stay kStages - 1 slices ahead
// across tile boundaries: the next tile's first slices load while this tile's last ones are
// multiplied and while the caller's epilogue runs, instead of the pipeline draining and filling
// again at every tile (the H200 profile, NOTES.md session 7).
struct TileRun {
  const uint16_t* __restrict__ x;
  int64_t rows;
  int64_t row0;
  const uint16_t* __restrict__ w;
  int64_t classes;
  int64_t col0;   // the first tile's first class
  int64_t tiles;
  int dim;
  int slices;     // depth slices a tile
};

__device__ __forceinline__ TileRun make_tile_run(const uint16_t* __restrict__ x, int64_t rows, int64_t row0,
                                                 const uint16_t* __restrict__ w, int64_t classes, int64_t col0,
                                                 int64_t tiles, int dim) {
  return {x, rows, row0, w, classes, col0, tiles, dim, (dim + kTileDepth - 1) / kTileDepth};
}

// Where the pipeline's next load goes: slice `slice` of the run's tile `tile`, into `stage`.
// Stepped by increments (no 64-bit division in the slice loop).
template <int kStages>
struct TileRunCursor {
  int64_t tile;
  int slice;
  int stage;

  __device__ __forceinline__ void advance(int slices) {
    if (++slice == slices) {
      slice = 0;
      ++tile;
    }
    if (++stage == kStages) stage = 0;
  }
};

// Issues the cursor's slice (nothing past the run's end) and commits one group either way, so that
// the groups committed always number the slices issued, empty ones included.
template <int kStages>
__device__ __forceinline__ void tile_run_load(const TileRun& run, uint16_t* smem, const TileRunCursor<kStages>& at) {
  if (at.tile < run.tiles)
    tile_load_slice(run.x, run.rows, run.row0, run.w, run.classes, run.col0 + at.tile * kTileClasses, run.dim,
                    smem, at.stage, at.slice);
  cp_async_commit();
}

// acc = X[row0 : row0+128, :] · W[col0 + 128·t : col0 + 128·(t+1), :]ᵀ, tile t of the run (see the
// top of the file). Every thread of the block calls it for t = 0, 1, ... in order; between two calls
// the caller must not touch `smem` (tile_smem_bytes(kStages) of dynamic shared memory: the next
// tile's first slices are landing there). After the run's last tile every copy has landed, every warp is past
// its last read, and `smem` is free again.
template <bool kBFloat16, bool kClassNorms, int kStages>
__device__ __forceinline__ void tile_run_gemm(const TileRun& run, int64_t t, uint16_t* smem, TileAcc& acc,
                                              float& norm_sq) {
  const int lane = threadIdx.x % 32;
  const int warp_m = threadIdx.x / 32 / 4;
  const int warp_n = threadIdx.x / 32 % 4;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.0f;
  norm_sq = 0.0f;

  static_assert(kStages >= kMinTileStages && kStages <= kMaxTileStages, "pipeline depth");
  // Slice g of the run (g = t·slices + slice) lands in stage g % kStages; the load issued at
  // slice g is slice g + kStages - 1, the prologue's are 0 .. kStages - 2.
  int stage = static_cast<int>(t * run.slices % kStages);
  TileRunCursor<kStages> next{t, 0, stage};
  if (t == 0) {
#pragma unroll 1
    for (int g = 0; g < kStages - 1; ++g) {
      tile_run_load(run, smem, next);
      next.advance(run.slices);
    }
  } else {
#pragma unroll 1
    for (int g = 0; g < kStages - 1; ++g) next.advance(run.slices);
  }
  for (int slice = 0; slice < run.slices; ++slice) {
    // Groups committed so far: kStages - 1 + g; this leaves at most kStages - 2 pending,
    // so slice g has landed. The barrier also means every warp is done with the stage the load
    // below overwrites (it was read at g - 1, in this tile or at the end of the previous one).
    cp_async_wait<kStages - 2>();
    __syncthreads();
    tile_run_load(run, smem, next);
    next.advance(run.slices);

    const uint16_t* sx = smem + stage * kTileStageElems;
    if (++stage == kStages) stage = 0;
    const uint16_t* sw = sx + kTileRows * kTilePitch;
    if constexpr (kClassNorms) {
      // Past the ends the slice holds zeros, which add nothing.
      norm_sq += sum_squares_16<kBFloat16>(sw + (threadIdx.x / 2) * kTilePitch + (threadIdx.x % 2) * 16);
    }
#pragma unroll
    for (int kk = 0; kk < kTileDepth; kk += 16) {
      // A fragments (16 x 16, row-major): lanes 0-15 address rows 0-15 at column kk, lanes 16-31
      // the same rows at kk + 8, giving the a0..a3 order of the mma.
      uint32_t a[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int r = warp_m * 64 + mi * 16 + lane % 16;
        ldmatrix_x4(a[mi], shared_address(sx + r * kTilePitch + kk + (lane / 16) * 8));
      }
      // B fragments (k16 x n8, W's rows are the n index): one ldmatrix.x4 gives two n8 tiles,
      // matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
      uint32_t b[4][2];
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        const int r = warp_n * 32 + nj * 16 + lane % 8 + (lane / 16) * 8;
        uint32_t tb[4];
        ldmatrix_x4(tb, shared_address(sw + r * kTilePitch + kk + (lane / 8 % 2) * 8));
        b[2 * nj][0] = tb[0];
        b[2 * nj][1] = tb[1];
        b[2 * nj + 1][0] = tb[2];
        b[2 * nj + 1][1] = tb[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16816<kBFloat16>(acc[mi][ni], a[mi], b[ni]);
    }
  }
  if (t + 1 == run.tiles) {
    cp_async_wait<0>();
    __syncthreads();
  }
}

// One tile alone: a run of one (its pipeline fills and drains within the call, `smem` is free
// again when it returns).
template <bool kBFloat16, bool kClassNorms, int kStages>
__device__ __forceinline__ void tile_gemm(const uint16_t* __restrict__ x, int64_t rows, int64_t row0,
                                          const uint16_t* __restrict__ w, int64_t classes, int64_t col0,
                                          int dim, uint16_t* smem, TileAcc& acc, float& norm_sq) {
  tile_run_gemm<kBFloat16, kClassNorms, kStages>(make_tile_run(x, rows, row0, w, classes, col0, 1, dim), 0, smem, acc,
                                        norm_sq);
}

}  // namespace cuda
}  // namespace arcface_ext

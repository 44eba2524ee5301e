// A 128 x 128 tile of x·Wᵀ on tensor cores (sm_80+), for 16-bit inputs with fp32 accumulation:
// the building block of the fused kernels, which consume the tile in registers and never write
// the cosines to global memory.
//
// One block of 8 warps computes acc = X[row0 : row0+128, :] · W[col0 : col0+128, :]ᵀ over the
// whole depth D (the rows of both operands are contiguous, D a multiple of 8 and both bases
// 16-byte aligned, so every global load is one 16-byte cp.async). The depth is walked in 32-wide
// slices through a kStages-deep cp.async pipeline (3 to 5 stages; the host picks, see
// fused_tile_stages), kept running across a run of tiles (TileRun);
// each warp owns a 64 x 32 sub-tile and issues mma.sync.m16n8k16 from ldmatrix fragments. Rows and
// classes past the ends load as zeros.
//
// With kClassNorms, tile_gemm also sums the squares of the W tile's elements as they pass through
// shared memory: thread t adds those of class t / 2, depth half t % 2 of each slice, so that
// norm_sq + (its xor-1 neighbour's) is ‖w_{col0 + t/2}‖², in the same order whatever the caller.
// Without it (a caller that has the tile's norms already) a depth slice takes about 35 of its ~150
// instructions less (sm_90 SASS of the fused backward, session 13).
//
// After tile_gemm returns, thread (warp, lane) holds in acc[mi][ni][2h + e] the dot product of
//   row   warp_m·64 + mi·16 + lane/4 + 8h      (warp_m = warp / 4, mi < 4, h < 2)
//   class warp_n·32 + ni·8 + 2·(lane % 4) + e  (warp_n = warp % 4, ni < 4, e < 2)
// relative to (row0, col0) — the mma accumulator layout, see tile_row / tile_class.
//
// With ARCFACE_EXT_EMULATE (tests/emulator, a host build of the kernels for CI), the six PTX
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

// 2^x as the SFU computes it (ex2.approx.ftz.f32: relative error at most 2^-22, results below
// FLT_MIN flushed to zero, 2^-inf = 0): one instruction, where expf takes eight. The fused
// epilogues' exponentials, whose arguments are at most 0 and whose sums only need fp32 accuracy.
__device__ __forceinline__ float ex2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#elif defined(ARCFACE_EXT_EMULATE)
  return ::emu::ex2_approx(x);
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

// sum plus the squares of 8 consecutive 16-bit values (one 16-byte shared-memory vector), in order.
template <bool kBFloat16>
__device__ __forceinline__ float sum_squares_8(const uint16_t* p, float sum) {
  const uint4 words = *reinterpret_cast<const uint4*>(p);
  const uint32_t w4[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = unpack_pair<kBFloat16>(w4[q]);
    sum = fmaf(f.x, f.x, sum);
    sum = fmaf(f.y, f.y, sum);
  }
  return sum;
}

// The sum of the squares of 16 consecutive 16-bit values (two 16-byte shared-memory vectors); a
// slice's partial sum is added to the running one once, which keeps the rounding error of a long
// depth down (D/32 additions in a row instead of D/2).
template <bool kBFloat16>
__device__ __forceinline__ float sum_squares_16(const uint16_t* p) {
  return sum_squares_8<kBFloat16>(p + 8, sum_squares_8<kBFloat16>(p, 0.0f));
}

// A run of tiles streamed through one kStages-deep cp.async pipeline: `passes` consecutive row
// tiles (from row0) against the same `tiles_per_pass` consecutive class tiles (from col0), class
// tiles inner: tile t of the run is class tile t % tiles_per_pass of row tile t / tiles_per_pass
// (one pass, the forward before session 13: a run of class tiles against one row tile). Depth
// slice g of the run (tile g / slices, slice g % slices) lands in stage g % kStages, and the loads
// stay kStages - 1 slices ahead across tile and pass boundaries: the next tile's first slices
// load while this tile's last ones are multiplied and while the caller's epilogue runs, instead of
// the pipeline draining and filling again at every tile (the H200 profile, NOTES.md session 7).
struct TileRun {
  const uint16_t* __restrict__ x;
  int64_t rows;
  int64_t row0;   // the first pass's first row
  const uint16_t* __restrict__ w;
  int64_t classes;
  int64_t col0;   // each pass's first class
  int64_t tiles;  // passes · tiles_per_pass
  int64_t tiles_per_pass;
  int dim;
  int slices;     // depth slices a tile
};

__device__ __forceinline__ TileRun make_tile_run(const uint16_t* __restrict__ x, int64_t rows, int64_t row0,
                                                 const uint16_t* __restrict__ w, int64_t classes, int64_t col0,
                                                 int64_t tiles_per_pass, int dim, int64_t passes = 1) {
  return {x, rows, row0, w, classes, col0, passes * tiles_per_pass, tiles_per_pass, dim,
          (dim + kTileDepth - 1) / kTileDepth};
}

// Where the pipeline's next load goes: slice `slice` of the run's tile `tile`, into `stage`, and
// this thread's part of it. Thread t copies the 16-byte vectors at column k = 8·(t % 4) of rows
// r = t / 4 and r + 64 of both operands. The cursor keeps the global addresses of its first x row
// and first class row at the slice's column and steps them by increments: the slice loop does no
// 64-bit multiply, and the row bounds are checked once a tile (the H200 run of session 8 counted
// ~120 address instructions a slice, against 32 mma, when every load recomputed its address).
template <int kStages>
struct TileRunCursor {
  int64_t tile;
  int64_t class_tile;     // tile % tiles_per_pass
  int64_t pass_row0;      // row0 + 128·(tile / tiles_per_pass)
  int slice;
  int stage;
  uint32_t dst;           // the shared address of this thread's x vector in `stage`
  const uint16_t* x_src;  // x row pass_row0 + r, column slice·32 + k
  const uint16_t* w_src;  // class row col0 + 128·class_tile + r, column slice·32 + k
  int depth_left;         // dim - (slice·32 + k): this thread's vectors of the slice exist while > 0
  bool x_ok[2];           // x rows pass_row0 + r and + 64 exist
  bool w_ok[2];           // class rows r and r + 64 of `class_tile` exist

  __device__ __forceinline__ void aim_at_rows(const TileRun& run) {
    const int64_t first = pass_row0 + threadIdx.x / 4;
#pragma unroll
    for (int u = 0; u < 2; ++u) x_ok[u] = first + 64 * u < run.rows;
    x_src = run.x + (x_ok[0] ? first * run.dim + (threadIdx.x % 4) * 8 : 0);
  }

  __device__ __forceinline__ void aim_at_tile(const TileRun& run) {
    const int r = threadIdx.x / 4;
    const int64_t first = run.col0 + class_tile * kTileClasses + r;
#pragma unroll
    for (int u = 0; u < 2; ++u) w_ok[u] = first + 64 * u < run.classes;
    w_src = run.w + (w_ok[0] ? first * run.dim + (threadIdx.x % 4) * 8 : 0);
  }

  // At slice 0 of tile t, stage `stage_of_t`; `smem` is the pipeline's shared memory.
  __device__ __forceinline__ void start(const TileRun& run, int64_t t, int stage_of_t, const uint16_t* smem) {
    tile = t;
    dst = shared_address(smem + stage_of_t * kTileStageElems + (threadIdx.x / 4) * kTilePitch + (threadIdx.x % 4) * 8);
    const int64_t pass = t / run.tiles_per_pass;
    class_tile = t - pass * run.tiles_per_pass;
    pass_row0 = run.row0 + pass * kTileRows;
    slice = 0;
    stage = stage_of_t;
    depth_left = run.dim - (threadIdx.x % 4) * 8;
    aim_at_rows(run);
    aim_at_tile(run);
  }

  __device__ __forceinline__ void advance(const TileRun& run) {
    dst += kTileStageElems * 2;
    if (++stage == kStages) {
      stage = 0;
      dst -= kStages * kTileStageElems * 2;
    }
    if (++slice == run.slices) {
      slice = 0;
      ++tile;
      depth_left += (run.slices - 1) * kTileDepth;
      if (++class_tile == run.tiles_per_pass) {  // the next pass: the next row tile, the first class tile
        class_tile = 0;
        pass_row0 += kTileRows;
        aim_at_rows(run);
      } else {
        x_src -= (run.slices - 1) * kTileDepth;
      }
      aim_at_tile(run);
    } else {
      x_src += kTileDepth;
      w_src += kTileDepth;
      depth_left -= kTileDepth;
    }
  }
};

// Issues the cursor's slice into its stage (nothing past the run's end) and commits one group
// either way, so that the groups committed always number the slices issued, empty ones included.
// Rows and depth past the ends load as zeros, from no address (the source then names the
// operand's first element, which is not read).
template <int kStages>
__device__ __forceinline__ void tile_run_load(const TileRun& run, const TileRunCursor<kStages>& at) {
  if (at.tile < run.tiles) {
    const bool in_depth = at.depth_left > 0;
    const int64_t second_row = int64_t{64} * run.dim;
    constexpr uint32_t kRowsBytes = 64 * kTilePitch * 2;  // 64 shared rows
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const bool x_ok = in_depth && at.x_ok[u];
      const bool w_ok = in_depth && at.w_ok[u];
      cp_async_16(at.dst + u * kRowsBytes, x_ok ? at.x_src + u * second_row : run.x, x_ok);
      cp_async_16(at.dst + (2 + u) * kRowsBytes, w_ok ? at.w_src + u * second_row : run.w, w_ok);
    }
  }
  cp_async_commit();
}

// acc = X[r0 : r0+128, :] · W[c0 : c0+128, :]ᵀ for tile t of the run, r0 = row0 + 128·(t / tiles_per_pass)
// and c0 = col0 + 128·(t % tiles_per_pass) (see the top of the file). Every thread of the block calls it for t = 0, 1, ... in order; between two calls
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
  TileRunCursor<kStages> next;
  next.start(run, t, stage, smem);
  if (t == 0) {
#pragma unroll 1
    for (int g = 0; g < kStages - 1; ++g) {
      tile_run_load(run, next);
      next.advance(run);
    }
  } else {
#pragma unroll 1
    for (int g = 0; g < kStages - 1; ++g) next.advance(run);
  }
  // This thread's shared-memory byte offsets within a stage, fixed for the run: the A fragments'
  // rows (x), the B fragments' rows (W) and its class-norm vectors; a slice adds only its stage's
  // base, and the fragment and kk steps are immediates.
  constexpr uint32_t kStageBytes = kTileStageElems * 2;
  constexpr uint32_t kPitchBytes = kTilePitch * 2;
  const uint32_t smem_base = shared_address(smem);
  const uint32_t a_offset = (warp_m * 64 + lane % 16) * kPitchBytes + (lane / 16) * 16;
  const uint32_t b_offset =
      (kTileRows + warp_n * 32 + lane % 8 + (lane / 16) * 8) * kPitchBytes + (lane / 8 % 2) * 16;
  const uint32_t norm_offset = (kTileRows + threadIdx.x / 2) * kTilePitch + (threadIdx.x % 2) * 16;  // elements
  // The fragments of depth kk of this stage: A (16 x 16, row-major: lanes 0-15 address rows 0-15 at
  // column kk, lanes 16-31 the same rows at kk + 8, giving the a0..a3 order of the mma) and B
  // (k16 x n8, W's rows are the n index: one ldmatrix.x4 gives two n8 tiles, matrices (n 0-7,
  // k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)).
  auto load_fragments = [&](uint32_t stage_base, int kk, uint32_t(&a)[4][4], uint32_t(&b)[4][2]) {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) ldmatrix_x4(a[mi], stage_base + a_offset + (mi * 16 * kTilePitch + kk) * 2);
#pragma unroll
    for (int nj = 0; nj < 2; ++nj) {
      uint32_t tb[4];
      ldmatrix_x4(tb, stage_base + b_offset + (nj * 16 * kTilePitch + kk) * 2);
      b[2 * nj][0] = tb[0];
      b[2 * nj][1] = tb[1];
      b[2 * nj + 1][0] = tb[2];
      b[2 * nj + 1][1] = tb[3];
    }
  };
  for (int slice = 0; slice < run.slices; ++slice) {
    // Groups committed so far: kStages - 1 + g; this leaves at most kStages - 2 pending,
    // so slice g has landed. The barrier also means every warp is done with the stage the load
    // below overwrites (it was read at g - 1, in this tile or at the end of the previous one).
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const uint32_t stage_base = smem_base + stage * kStageBytes;
    const uint16_t* stage_elems = smem + stage * kTileStageElems;
    if (++stage == kStages) stage = 0;
#pragma unroll
    for (int kk = 0; kk < kTileDepth; kk += 16) {
      uint32_t a[4][4], b[4][2];
      load_fragments(stage_base, kk, a, b);
      if (kk == 0) {
        // Issued after the first fragments' ldmatrix (another stage, free since the barrier): the
        // copies' address work covers the ldmatrix latency, which the mma would otherwise wait out
        // (shared-memory accesses keep their program order in the SASS).
        tile_run_load(run, next);
        next.advance(run);
        if constexpr (kClassNorms) {
          // Past the ends the slice holds zeros, which add nothing.
          norm_sq += sum_squares_16<kBFloat16>(stage_elems + norm_offset);
        }
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

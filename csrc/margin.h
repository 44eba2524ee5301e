// The per-row maths of the combined margin, shared by the CPU and CUDA kernels.
//
// The target logit of row i is s * (psi(c_y) - m3), where c_y is the clamped cosine between the
// normalised embedding and its class centre.  Everything here is evaluated once per row (N values),
// so it is written in double for accuracy regardless of the input dtype; the N x C part of the
// problem never touches this file.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ARCFACE_HD __host__ __device__ __forceinline__
#else
#define ARCFACE_HD inline
#endif

namespace arcface_ext {

// Norms below this are clamped (as F.normalize does): a zero vector normalises to zero.
constexpr double kNormEps = 1e-12;
// sin(theta) is clamped away from zero in the exact margin derivative so it stays finite at c = +-1.
constexpr double kSinThetaEps = 1e-6;
constexpr double kPi = 3.14159265358979323846;

struct MarginParams {
  double s;
  double m1;
  double m2;
  double m3;
  double lambda;
  bool straight_through;  // dpsi/dc := 1 (today's insightface behaviour)
  // Per-row (m2_i, m3_i) pairs, N x 2 on the kernel's device, replacing m2 and m3 (AdaFace's and
  // ElasticFace's per-sample margins); nullptr for the scalars.
  const double* row_margins = nullptr;
};

// The margins of row i: its (m2, m3) pair when `p` has per-row margins, else the scalars.
ARCFACE_HD MarginParams row_params(const MarginParams& p, int64_t i) {
  if (p.row_margins == nullptr) return p;
  MarginParams q = p;
  q.m2 = p.row_margins[2 * i];
  q.m3 = p.row_margins[2 * i + 1];
  return q;
}

struct TargetMargin {
  double logit;  // s * (psi - m3)
  double dlogit_dc;  // s * dpsi/dc, the chain factor from the target cosine to its logit
};

// psi(c) and s * dpsi/dc for a clamped target cosine c in [-1, 1].
ARCFACE_HD TargetMargin target_margin(double c, const MarginParams& p) {
  double psi;
  double dpsi;
  if (p.m1 == 1.0 && p.m2 == 0.0) {
    // CosFace (or plain softmax): no angular margin, so avoid acos round-off entirely.
    psi = c;
    dpsi = 1.0;
  } else {
    const double theta = acos(c);
    const double sin_theta = fmax(sin(theta), kSinThetaEps);
    if (p.m1 == 1.0) {
      // ArcFace: cos(theta + m2) while theta + m2 stays within [0, pi]; past that the
      // cosine would turn back up, so insightface continues linearly with c - m2 sin(m2).
      // A negative margin (AdaFace's, for high-quality rows) that takes theta + m2 below 0
      // holds psi at cos 0 = 1, as AdaFace's clip of theta + m2 to [eps, pi - eps] does.
      if (theta + p.m2 < 0.0) {
        psi = 1.0;
        dpsi = 0.0;
      } else if (theta + p.m2 <= kPi) {
        psi = cos(theta + p.m2);
        dpsi = sin(theta + p.m2) / sin_theta;
      } else {
        psi = c - p.m2 * sin(p.m2);
        dpsi = 1.0;
      }
    } else {
      // SphereFace: the monotone psi = (-1)^k cos(m1 theta + m2) - 2k, k = floor((m1 theta + m2) / pi).
      const double t = p.m1 * theta + p.m2;
      const double k = floor(t / kPi);
      const double sign = fmod(k, 2.0) == 0.0 ? 1.0 : -1.0;
      psi = sign * cos(t) - 2.0 * k;
      dpsi = sign * p.m1 * sin(t) / sin_theta;
    }
  }
  if (p.lambda > 0.0) {
    // SphereFace's annealing: blend the margin target with the plain cosine.
    psi = (psi + p.lambda * c) / (1.0 + p.lambda);
    dpsi = (dpsi + p.lambda) / (1.0 + p.lambda);
  }
  if (p.straight_through) dpsi = 1.0;
  return {p.s * (psi - p.m3), p.s * dpsi};
}

// Into [-1, 1]; NaN (a NaN or inf in an input) stays NaN, as in the reference, where fmin and fmax
// would drop it.
ARCFACE_HD double clamp_cosine(double c) { return c < -1.0 ? -1.0 : (c > 1.0 ? 1.0 : c); }

}  // namespace arcface_ext

// kvc/ops/lowrank.hpp: truncated SVD and principal components, the decompositions behind the
// key-projection policies (ShadowKV, Palu-style latents, Loki).
//
//   std::vector<float> u(m * r), sv(r * n);
//   kvc::ops::truncated_svd(kvc::Cpu{}, x, kvc::make_view(u.data(), {m, r}),
//                           kvc::make_view(sv.data(), {r, n}));    // x [m, n] ~= u sv
//   kvc::ops::principal_components(kvc::Cpu{}, x, components, explained);
//
// CPU reference only (Eigen, computed in double, results rounded to float). Determinism: singular
// values / variances descending; each component's sign is fixed so that its largest-magnitude
// entry (ties: lower index) is positive, so repeated runs and other BLAS builds agree.
#pragma once

#include <span>

#include "kvc/core/backend.hpp"
#include "kvc/core/view.hpp"

namespace kvc::ops {

// Rank-r truncated SVD x = U S V^T: u = U[:, :r], sv = diag(S[:r]) V^T[:r] (the ShadowKV split).
// r = u.size(1) = sv.size(0) <= min(m, n). singular, when not empty, receives S[:r].
void truncated_svd(Cpu, HostView<const float, 2> x,   // [m, n]
                   HostView<float, 2> u,              // [m, r]
                   HostView<float, 2> sv,             // [r, n]
                   std::span<double> singular = {});  // [r] or empty

// Right singular vectors of x without centring (V[:, :r] of x = U S V^T): an orthonormal basis of
// the row space, used to project rows to a latent of r values (Palu-style latent keys).
void right_singular_vectors(Cpu, HostView<const float, 2> x,  // [m, n]
                            HostView<float, 2> basis);        // [n, r], r <= min(m, n)

// Principal components of the rows of x (covariance of the mean-centred rows, divided by m - 1):
// components column j = j-th direction, variance descending; explained[j] = its share of the
// total variance (sums to 1; all 0 when x has no variance). Needs m >= 2.
void principal_components(Cpu, HostView<const float, 2> x,  // [m, n]
                          HostView<float, 2> components,    // [n, n]
                          std::span<float> explained);      // [n]

}  // namespace kvc::ops

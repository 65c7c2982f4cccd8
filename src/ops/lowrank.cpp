// CPU reference of kvc/ops/lowrank.hpp: Eigen's divide-and-conquer SVD and self-adjoint eigen
// solver, in double.
#include "kvc/ops/lowrank.hpp"

#include <Eigen/Dense>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kvc/core/error.hpp"

namespace kvc::ops {
namespace {

Eigen::MatrixXd to_matrix(HostView<const float, 2> x) {
  Eigen::MatrixXd m(x.size(0), x.size(1));
  for (std::int64_t i = 0; i < x.size(0); ++i)
    for (std::int64_t j = 0; j < x.size(1); ++j) m(i, j) = x(i, j);
  return m;
}

// +1 or -1 such that column j of v has a positive largest-magnitude entry (ties: lower index).
double sign_of(const Eigen::MatrixXd& v, Eigen::Index j) {
  Eigen::Index best = 0;
  for (Eigen::Index i = 1; i < v.rows(); ++i)
    if (std::abs(v(i, j)) > std::abs(v(best, j))) best = i;
  return v(best, j) < 0 ? -1.0 : 1.0;
}

void check_finite(HostView<const float, 2> x, const char* who) {
  for (std::int64_t i = 0; i < x.size(0); ++i)
    for (std::int64_t j = 0; j < x.size(1); ++j)
      KVC_CHECK(std::isfinite(x(i, j)), who, ": x[", i, ", ", j, "] = ", x(i, j), " is not finite");
}

}  // namespace

void truncated_svd(Cpu, HostView<const float, 2> x, HostView<float, 2> u, HostView<float, 2> sv,
                   std::span<double> singular) {
  const std::int64_t m = x.size(0), n = x.size(1), r = u.size(1);
  KVC_CHECK(m >= 1 && n >= 1, "truncated_svd: x must be non-empty, got [", m, ", ", n, "]");
  KVC_CHECK(r >= 1 && r <= std::min(m, n), "truncated_svd: rank r = ", r, " must be in [1, ",
            std::min(m, n), "] for x [", m, ", ", n, "]");
  KVC_CHECK(u.size(0) == m && sv.size(0) == r && sv.size(1) == n, "truncated_svd: u must be [", m,
            ", ", r, "] and sv [", r, ", ", n, "], got [", u.size(0), ", ", u.size(1), "] and [",
            sv.size(0), ", ", sv.size(1), "]");
  KVC_CHECK(singular.empty() || static_cast<std::int64_t>(singular.size()) == r,
            "truncated_svd: singular must hold r = ", r, " values, got ", singular.size());
  check_finite(x, "truncated_svd");
  const Eigen::BDCSVD<Eigen::MatrixXd> svd(to_matrix(x), Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::MatrixXd& uu = svd.matrixU();
  const Eigen::MatrixXd& vv = svd.matrixV();
  const Eigen::VectorXd& s = svd.singularValues();
  for (std::int64_t k = 0; k < r; ++k) {
    const double sign = sign_of(vv, k);
    for (std::int64_t i = 0; i < m; ++i) u(i, k) = static_cast<float>(sign * uu(i, k));
    for (std::int64_t j = 0; j < n; ++j) sv(k, j) = static_cast<float>(sign * s(k) * vv(j, k));
    if (!singular.empty()) singular[k] = s(k);
  }
}

void right_singular_vectors(Cpu, HostView<const float, 2> x, HostView<float, 2> basis) {
  const std::int64_t m = x.size(0), n = x.size(1), r = basis.size(1);
  KVC_CHECK(basis.size(0) == n && r >= 1 && r <= std::min(m, n),
            "right_singular_vectors: basis must be [", n, ", r] with r in [1, ", std::min(m, n),
            "], got [", basis.size(0), ", ", r, "]");
  check_finite(x, "right_singular_vectors");
  const Eigen::BDCSVD<Eigen::MatrixXd> svd(to_matrix(x), Eigen::ComputeThinV);
  const Eigen::MatrixXd& vv = svd.matrixV();
  for (std::int64_t k = 0; k < r; ++k) {
    const double sign = sign_of(vv, k);
    for (std::int64_t j = 0; j < n; ++j) basis(j, k) = static_cast<float>(sign * vv(j, k));
  }
}

void principal_components(Cpu, HostView<const float, 2> x, HostView<float, 2> components,
                          std::span<float> explained) {
  const std::int64_t m = x.size(0), n = x.size(1);
  KVC_CHECK(m >= 2 && n >= 1, "principal_components: needs at least 2 rows, got [", m, ", ", n,
            "]");
  KVC_CHECK(components.size(0) == n && components.size(1) == n &&
                static_cast<std::int64_t>(explained.size()) == n,
            "principal_components: components must be [", n, ", ", n, "] and explained [", n, "]");
  check_finite(x, "principal_components");
  Eigen::MatrixXd centred = to_matrix(x);
  centred.rowwise() -= centred.colwise().mean();
  const Eigen::MatrixXd covariance = (centred.transpose() * centred) / static_cast<double>(m - 1);
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(covariance);
  KVC_CHECK(eig.info() == Eigen::Success, "principal_components: eigen solver failed");
  // Eigen returns ascending eigenvalues: reverse, clamp round-off negatives to 0.
  const Eigen::VectorXd values = eig.eigenvalues().reverse().cwiseMax(0.0);
  const Eigen::MatrixXd vectors = eig.eigenvectors().rowwise().reverse();
  const double total = values.sum();
  for (std::int64_t k = 0; k < n; ++k) {
    const double sign = sign_of(vectors, k);
    for (std::int64_t j = 0; j < n; ++j)
      components(j, k) = static_cast<float>(sign * vectors(j, k));
    explained[k] = total > 0 ? static_cast<float>(values(k) / total) : 0.0f;
  }
}

}  // namespace kvc::ops

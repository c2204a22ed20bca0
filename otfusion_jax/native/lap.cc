// Exact linear assignment (square, dense) as an XLA FFI custom call on the CPU.
//
// Why this exists: the host solvers (scipy, lapjv) reach XLA through jax.pure_callback, and a program
// holding a Python callback cannot be loaded from JAX's persistent compilation cache by a new process.
// An FFI target is referred to by name only, so programs that call it are cached like any other, and the
// solve runs without the Python round trip.
//
// Algorithm: Jonker & Volgenant (1987): column reduction, reduction transfer and two passes of augmenting row
// reduction assign most rows cheaply; then one shortest augmenting path (Dijkstra on reduced costs, the path
// search of Crouse 2016 / scipy's linear_sum_assignment) for every row left free. Dual feasibility holds throughout,
// so the result is an optimal assignment; where several assignments tie, which one comes back may differ
// from scipy's or lapjv's. Arithmetic in double whatever the input type.
//
// Input: a cost of shape (..., n, n), float32 or float64. Output: perm of shape (..., n), int32, with
// perm[j] = the row assigned to column j (the convention of otfusion_jax.ot.exact_assignment).
// Leading dimensions are a batch (jax.vmap with vmap_method="broadcast_all"), solved one after another.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Solves one n x n problem; returns false (and leaves `perm` undefined) if the costs are not finite.
template <typename T>
bool SolveOne(const T* cost, int64_t n, int32_t* perm, std::string* error) {
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t k = 0; k < n * n; ++k) {
    if (!std::isfinite(static_cast<double>(cost[k]))) {
      *error = "cost entry (" + std::to_string(k / n) + ", " + std::to_string(k % n) + ") is not finite";
      return false;
    }
  }
  if (n == 1) {  // the row reduction below needs a second column
    perm[0] = 0;
    return true;
  }
  std::vector<double> u(n, 0.0), v(n, inf);
  std::vector<int64_t> col4row(n, -1), row4col(n, -1), argmin(n, 0);
  // Column reduction: v[j] = min_i c[i][j] (row-major scan); each row keeps the column of smallest v among those
  // whose minimum it holds.
  for (int64_t i = 0; i < n; ++i) {
    const T* row = cost + i * n;
    for (int64_t j = 0; j < n; ++j) {
      const double c = static_cast<double>(row[j]);
      if (c < v[j]) {
        v[j] = c;
        argmin[j] = i;
      }
    }
  }
  for (int64_t j = n - 1; j >= 0; --j) {
    const int64_t i = argmin[j];
    if (col4row[i] == -1) {
      col4row[i] = j;
      row4col[j] = i;
    } else if (v[j] < v[col4row[i]]) {
      row4col[col4row[i]] = -1;
      col4row[i] = j;
      row4col[j] = i;
    }
  }
  // Reduction transfer: a row that holds one column lowers that column's v by its second-smallest reduced cost.
  std::vector<int64_t> free_rows;
  free_rows.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (col4row[i] == -1) {
      free_rows.push_back(i);
      continue;
    }
    const int64_t j1 = col4row[i];
    const T* row = cost + i * n;
    double mu = inf;
    for (int64_t j = 0; j < n; ++j) {
      if (j != j1) mu = std::min(mu, static_cast<double>(row[j]) - v[j]);
    }
    if (mu < inf) v[j1] -= mu;
  }
  // Augmenting row reduction (two passes; Jonker & Volgenant): a free row takes its cheapest column, lowering
  // that column's v to its second-cheapest, and the row it displaces is served next. Capped, since its
  // progress per step can be tiny in floating point; whatever is still free goes to the augmenting paths.
  int64_t steps = 0;
  const int64_t max_steps = 16 * n + 64;
  for (int pass = 0; pass < 2 && !free_rows.empty() && steps < max_steps; ++pass) {
    std::vector<int64_t> next;
    size_t k = 0;
    while (k < free_rows.size() && steps < max_steps) {
      ++steps;
      const int64_t i = free_rows[k++];
      const T* row = cost + i * n;
      double umin = static_cast<double>(row[0]) - v[0], usub = inf;
      int64_t j1 = 0, j2 = -1;
      for (int64_t j = 1; j < n; ++j) {
        const double h = static_cast<double>(row[j]) - v[j];
        if (h < usub) {
          if (h >= umin) {
            usub = h;
            j2 = j;
          } else {
            usub = umin;
            umin = h;
            j2 = j1;
            j1 = j;
          }
        }
      }
      int64_t i0 = row4col[j1];
      const bool strict = umin < usub;
      if (strict) {
        v[j1] -= usub - umin;
      } else if (i0 != -1 && j2 != -1) {
        j1 = j2;
        i0 = row4col[j2];
      }
      if (i0 != -1) col4row[i0] = -1;
      col4row[i] = j1;
      row4col[j1] = i;
      if (i0 != -1) {
        if (strict) {
          free_rows[--k] = i0;  // serve the displaced row next
        } else {
          next.push_back(i0);
        }
      }
    }
    for (; k < free_rows.size(); ++k) next.push_back(free_rows[k]);
    free_rows.swap(next);
  }
  // Row duals u[i] = min_j (c[i][j] - v[j]): feasible. An assigned pair that is not tight (rounding) is freed, so
  // the augmenting paths below only ever walk tight assigned edges.
  for (int64_t i = 0; i < n; ++i) {
    const T* row = cost + i * n;
    double m = inf;
    for (int64_t j = 0; j < n; ++j) m = std::min(m, static_cast<double>(row[j]) - v[j]);
    u[i] = m;
    const int64_t j = col4row[i];
    if (j != -1 && static_cast<double>(row[j]) - v[j] - m > 1e-12 * (1.0 + std::fabs(m))) {
      row4col[j] = -1;
      col4row[i] = -1;
    }
  }
  // Shortest augmenting path from every free row.
  std::vector<double> shortest(n);
  std::vector<int64_t> path(n), remaining(n);
  std::vector<char> scanned_row(n), scanned_col(n);
  for (int64_t cur = 0; cur < n; ++cur) {
    if (col4row[cur] != -1) continue;
    std::fill(shortest.begin(), shortest.end(), inf);
    std::fill(path.begin(), path.end(), -1);
    std::fill(scanned_row.begin(), scanned_row.end(), 0);
    std::fill(scanned_col.begin(), scanned_col.end(), 0);
    for (int64_t j = 0; j < n; ++j) remaining[j] = n - 1 - j;
    int64_t num_remaining = n;
    double min_val = 0.0;
    int64_t i = cur, sink = -1;
    while (sink == -1) {
      scanned_row[i] = 1;
      const T* row = cost + i * n;
      const double ui = u[i];
      double lowest = inf;
      int64_t index = -1;
      for (int64_t it = 0; it < num_remaining; ++it) {
        const int64_t j = remaining[it];
        const double r = min_val + static_cast<double>(row[j]) - ui - v[j];
        if (r < shortest[j]) {
          path[j] = i;
          shortest[j] = r;
        }
        if (shortest[j] < lowest || (shortest[j] == lowest && row4col[j] == -1)) {
          lowest = shortest[j];
          index = it;
        }
      }
      min_val = lowest;
      if (index == -1 || min_val == inf) {  // cannot happen with finite costs; guards against a bad state
        *error = "no augmenting path (internal error)";
        return false;
      }
      const int64_t j = remaining[index];
      if (row4col[j] == -1) {
        sink = j;
      } else {
        i = row4col[j];
      }
      scanned_col[j] = 1;
      remaining[index] = remaining[--num_remaining];
    }
    // Dual update, then flip the path.
    u[cur] += min_val;
    for (int64_t r = 0; r < n; ++r) {
      if (scanned_row[r] && r != cur) u[r] += min_val - shortest[col4row[r]];
    }
    for (int64_t c = 0; c < n; ++c) {
      if (scanned_col[c]) v[c] -= min_val - shortest[c];
    }
    int64_t j = sink;
    while (true) {
      const int64_t r = path[j];
      row4col[j] = r;
      const int64_t previous = col4row[r];
      col4row[r] = j;
      if (r == cur) break;
      j = previous;
    }
  }
  for (int64_t j = 0; j < n; ++j) perm[j] = static_cast<int32_t>(row4col[j]);
  return true;
}

template <ffi::DataType D>
ffi::Error Assign(ffi::Buffer<D> cost, ffi::ResultBuffer<ffi::S32> perm) {
  const auto dims = cost.dimensions();
  if (dims.size() < 2 || dims[dims.size() - 1] != dims[dims.size() - 2]) {
    return ffi::Error::InvalidArgument("otfusion_lap: the cost must be square in its last two axes");
  }
  const int64_t n = dims[dims.size() - 1];
  if (n == 0) return ffi::Error::Success();
  const int64_t batch = static_cast<int64_t>(cost.element_count()) / (n * n);
  const auto* data = cost.typed_data();
  int32_t* out = perm->typed_data();
  std::string error;
  for (int64_t b = 0; b < batch; ++b) {
    if (!SolveOne(data + b * n * n, n, out + b * n, &error)) {
      return ffi::Error::InvalidArgument("otfusion_lap: problem " + std::to_string(b) + ": " + error);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OtfusionLapF32, Assign<ffi::F32>,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::S32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OtfusionLapF64, Assign<ffi::F64>,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F64>>().Ret<ffi::Buffer<ffi::S32>>());

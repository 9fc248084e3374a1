// Fused in-place optimizer updates over contiguous float32 arrays (module shoal.kernels._fused).
//
// numpy runs an Adam step as ~11 passes over memory, each with a temporary;
// these loops read each operand once and write each result once. They are
// what the numpy backend uses for float32 C-contiguous arrays (the engine's
// parameters, the parameter server's dense tables); anything else takes the
// generic numpy path. Every function releases the GIL.
#include "dedup.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <pybind11/stl.h>

namespace py = pybind11;

namespace {

using F32 = py::array_t<float, py::array::c_style>;

float* data_of(py::array& a, const char* what, py::ssize_t n) {
    if (!a.dtype().equal(py::dtype::of<float>()) || !(a.flags() & py::array::c_style) ||
        !a.writeable() || a.size() != n) {
        throw py::type_error(std::string(what) +
                             " must be a writeable C-contiguous float32 array of the parameter's size");
    }
    return static_cast<float*>(a.mutable_data());
}

const float* cdata_of(const py::array& a, const char* what, py::ssize_t n) {
    if (!a.dtype().equal(py::dtype::of<float>()) || !(a.flags() & py::array::c_style) || a.size() != n) {
        throw py::type_error(std::string(what) + " must be a C-contiguous float32 array of the parameter's size");
    }
    return static_cast<const float*>(a.data());
}

}  // namespace

PYBIND11_MODULE(_fused, m) {
    m.doc() = "Fused in-place optimizer updates over contiguous float32 arrays.";

    m.def(
        "sgd",
        [](py::array p, const py::array& g, double lr_d) {
            const float lr = static_cast<float>(lr_d);
            const py::ssize_t n = p.size();
            float* pp = data_of(p, "param", n);
            const float* gg = cdata_of(g, "grad", n);
            py::gil_scoped_release nogil;
            for (py::ssize_t i = 0; i < n; ++i) pp[i] -= lr * gg[i];
        },
        py::arg("param"), py::arg("grad"), py::arg("lr"), "param -= lr * grad, in place.");

    m.def(
        "momentum",
        [](py::array p, const py::array& g, py::array v, double lr_d, double mu_d, bool nesterov) {
            const float lr = static_cast<float>(lr_d), mu = static_cast<float>(mu_d);
            const py::ssize_t n = p.size();
            float* pp = data_of(p, "param", n);
            float* vv = data_of(v, "velocity", n);
            const float* gg = cdata_of(g, "grad", n);
            py::gil_scoped_release nogil;
            for (py::ssize_t i = 0; i < n; ++i) {
                const float vi = mu * vv[i] + gg[i];
                vv[i] = vi;
                pp[i] -= nesterov ? lr * (gg[i] + mu * vi) : lr * vi;
            }
        },
        py::arg("param"), py::arg("grad"), py::arg("velocity"), py::arg("lr"), py::arg("momentum"),
        py::arg("nesterov"), "v = mu * v + g; param -= lr * v (or lr * (g + mu * v) with Nesterov).");

    m.def(
        "adam",
        [](py::array p, const py::array& g, py::array m1, py::array m2, double lr, double b1_d, double b2_d,
           double eps_d, int64_t step, double weight_decay) {
            // Derived constants in double, then rounded once, as numpy does with Python floats.
            const float b1 = static_cast<float>(b1_d), b2 = static_cast<float>(b2_d);
            const float eps = static_cast<float>(eps_d);
            const py::ssize_t n = p.size();
            float* pp = data_of(p, "param", n);
            float* mm = data_of(m1, "moment1", n);
            float* vv = data_of(m2, "moment2", n);
            const float* gg = cdata_of(g, "grad", n);
            const double bias1 = 1.0 - std::pow(b1_d, static_cast<double>(step));
            const double bias2 = 1.0 - std::pow(b2_d, static_cast<double>(step));
            const float step_size = static_cast<float>(lr / bias1);
            const float inv_sqrt_bias2 = static_cast<float>(1.0 / std::sqrt(bias2));
            const float decay = static_cast<float>(1.0 - lr * weight_decay);
            const float c1 = static_cast<float>(1.0 - b1_d), c2 = static_cast<float>(1.0 - b2_d);
            py::gil_scoped_release nogil;
            for (py::ssize_t i = 0; i < n; ++i) {
                const float gi = gg[i];
                const float mi = b1 * mm[i] + c1 * gi;
                const float vi = b2 * vv[i] + c2 * (gi * gi);
                mm[i] = mi;
                vv[i] = vi;
                pp[i] = pp[i] * decay - step_size * mi / (std::sqrt(vi) * inv_sqrt_bias2 + eps);
            }
        },
        py::arg("param"), py::arg("grad"), py::arg("moment1"), py::arg("moment2"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("step"), py::arg("weight_decay"),
        "One bias-corrected Adam step; a non-zero weight_decay is decoupled (AdamW).");

    m.def(
        "adagrad",
        [](py::array p, const py::array& g, py::array acc, double lr_d, double eps_d) {
            const float lr = static_cast<float>(lr_d), eps = static_cast<float>(eps_d);
            const py::ssize_t n = p.size();
            float* pp = data_of(p, "param", n);
            float* aa = data_of(acc, "moment", n);
            const float* gg = cdata_of(g, "grad", n);
            py::gil_scoped_release nogil;
            for (py::ssize_t i = 0; i < n; ++i) {
                const float ai = aa[i] + gg[i] * gg[i];
                aa[i] = ai;
                pp[i] -= lr * gg[i] / (std::sqrt(ai) + eps);
            }
        },
        py::arg("param"), py::arg("grad"), py::arg("moment"), py::arg("lr"), py::arg("eps"),
        "acc += g * g; param -= lr * g / (sqrt(acc) + eps).");

    m.def(
        "ctr_push",
        [](py::array values, const py::array& rows_a, const py::array& grads_a, const py::array& shows_a,
           const py::array& clicks_a, int rule, int dim, std::vector<int> state_cols,
           std::vector<int> stat_cols, double lr_d, double g0_d, double lo_d, double hi_d,
           double nonclk_d, double clk_d, bool scale_by_show, double b1_d, double b2_d, double eps_d) {
            // One pass per row of a sparse table's arena (CtrCommonAccessor + sparse_sgd_rule): the
            // statistics, the gradient divided by the show, the rule's step with weight bounds.
            if (values.ndim() != 2 || !values.dtype().equal(py::dtype::of<float>()) ||
                !(values.flags() & py::array::c_style) || !values.writeable())
                throw py::type_error("ctr_push: values must be a writeable C-contiguous float32 [rows, width] array");
            const py::ssize_t cap = values.shape(0), width = values.shape(1);
            if (!rows_a.dtype().equal(py::dtype::of<int64_t>()) || rows_a.ndim() != 1 ||
                !(rows_a.flags() & py::array::c_style))
                throw py::type_error("ctr_push: rows must be a 1-D C-contiguous int64 array");
            const py::ssize_t n = rows_a.shape(0);
            const float* g = cdata_of(grads_a, "grads", n * dim);
            const float* sh = cdata_of(shows_a, "shows", n);
            const float* ck = cdata_of(clicks_a, "clicks", n);
            const int64_t* rows = static_cast<const int64_t*>(rows_a.data());
            const size_t want_states = rule == 0 ? 0 : rule == 1 ? 1 : rule == 2 ? 1 : 4;
            if (rule < 0 || rule > 3 || state_cols.size() != want_states || stat_cols.size() != 4 ||
                dim < 1 || dim > width)
                throw py::value_error("ctr_push: bad rule, dim or column layout");
            for (int c : state_cols) if (c < 0 || c >= width) throw py::value_error("ctr_push: state column out of range");
            for (int c : stat_cols) if (c < 0 || c >= width) throw py::value_error("ctr_push: stat column out of range");
            for (py::ssize_t i = 0; i < n; ++i)
                if (rows[i] < 0 || rows[i] >= cap) throw py::index_error("ctr_push: row " + std::to_string(rows[i]) + " out of range");
            float* v = static_cast<float*>(values.mutable_data());
            const float lr = static_cast<float>(lr_d), g0 = static_cast<float>(g0_d);
            const float lo = static_cast<float>(lo_d), hi = static_cast<float>(hi_d);
            const float nonclk = static_cast<float>(nonclk_d), clk = static_cast<float>(clk_d);
            const float b1 = static_cast<float>(b1_d), b2 = static_cast<float>(b2_d), eps = static_cast<float>(eps_d);
            const int show = stat_cols[0], click = stat_cols[1], delta = stat_cols[2], unseen = stat_cols[3];
            py::gil_scoped_release nogil;
            std::vector<float> gs(static_cast<size_t>(dim));
            for (py::ssize_t i = 0; i < n; ++i) {
                float* r = v + rows[i] * width;
                const float s = sh[i], c = ck[i];
                r[show] += s;
                r[click] += c;
                r[delta] += (s - c) * nonclk + c * clk;
                r[unseen] = 0.0f;
                const float d = scale_by_show ? std::max(s, 1.0f) : 1.0f;
                for (int j = 0; j < dim; ++j) gs[j] = g[i * dim + j] / d;
                float* w = r;
                if (rule == 0) {  // naive
                    for (int j = 0; j < dim; ++j) w[j] = std::min(std::max(w[j] - lr * gs[j], lo), hi);
                } else if (rule == 1) {  // adagrad: one g2sum per row
                    float& g2 = r[state_cols[0]];
                    const float step = lr * std::sqrt(g0 / (g0 + g2));
                    float sq = 0.0f;
                    for (int j = 0; j < dim; ++j) {
                        w[j] = std::min(std::max(w[j] - step * gs[j], lo), hi);
                        sq += gs[j] * gs[j];
                    }
                    g2 += sq / static_cast<float>(dim);
                } else if (rule == 2) {  // std_adagrad: g2sum per element
                    float* g2 = r + state_cols[0];
                    for (int j = 0; j < dim; ++j) {
                        w[j] = std::min(std::max(w[j] - lr * gs[j] * std::sqrt(g0 / (g0 + g2[j])), lo), hi);
                        g2[j] += gs[j] * gs[j];
                    }
                } else {  // adam: moments per element, beta powers per row
                    float* m = r + state_cols[0];
                    float* vv = r + state_cols[1];
                    float& p1 = r[state_cols[2]];
                    float& p2 = r[state_cols[3]];
                    const float corr2 = std::sqrt(1.0f - p2);
                    const float step = lr * corr2 / (1.0f - p1);
                    for (int j = 0; j < dim; ++j) {
                        m[j] = b1 * m[j] + (1.0f - b1) * gs[j];
                        vv[j] = b2 * vv[j] + (1.0f - b2) * gs[j] * gs[j];
                        w[j] = std::min(std::max(w[j] - step * m[j] / (std::sqrt(vv[j]) + eps * corr2), lo), hi);
                    }
                    p1 *= b1;
                    p2 *= b2;
                }
            }
        },
        py::arg("values"), py::arg("rows"), py::arg("grads"), py::arg("shows"), py::arg("clicks"),
        py::arg("rule"), py::arg("dim"), py::arg("state_cols"), py::arg("stat_cols"), py::arg("lr"),
        py::arg("g0"), py::arg("lo"), py::arg("hi"), py::arg("nonclk"), py::arg("clk"),
        py::arg("scale_by_show"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        "Apply merged CTR pushes to arena rows in place (rule 0 naive, 1 adagrad, 2 std_adagrad, 3 adam).");

    m.def(
        "ctr_pull",
        [](py::array values, const py::array& rows_a, py::array out, const py::object& pos_obj, int dim,
           int unseen_col) {
            // out[pos[i]] = values[rows[i], :dim] (zeros where rows[i] < 0); with unseen_col >= 0
            // the row's unseen-days counter is reset (a training pull saw the key).
            if (values.ndim() != 2 || !values.dtype().equal(py::dtype::of<float>()) ||
                !(values.flags() & py::array::c_style) || !values.writeable())
                throw py::type_error("ctr_pull: values must be a writeable C-contiguous float32 [rows, width] array");
            const py::ssize_t cap = values.shape(0), width = values.shape(1);
            if (!rows_a.dtype().equal(py::dtype::of<int64_t>()) || rows_a.ndim() != 1 ||
                !(rows_a.flags() & py::array::c_style))
                throw py::type_error("ctr_pull: rows must be a 1-D C-contiguous int64 array");
            if (out.ndim() != 2 || out.shape(1) != dim || dim < 1 || dim > width || unseen_col >= width)
                throw py::value_error("ctr_pull: out must be [n, dim] with dim <= the row width");
            const py::ssize_t n = rows_a.shape(0), n_out = out.shape(0);
            float* o = data_of(out, "out", n_out * dim);
            const int64_t* rows = static_cast<const int64_t*>(rows_a.data());
            const int64_t* pos = nullptr;
            py::array pos_a;
            if (!pos_obj.is_none()) {
                pos_a = py::reinterpret_borrow<py::array>(pos_obj);
                if (!pos_a.dtype().equal(py::dtype::of<int64_t>()) || pos_a.ndim() != 1 ||
                    pos_a.shape(0) != n || !(pos_a.flags() & py::array::c_style))
                    throw py::type_error("ctr_pull: pos must be a 1-D C-contiguous int64 array of len(rows)");
                pos = static_cast<const int64_t*>(pos_a.data());
            } else if (n_out != n) {
                throw py::value_error("ctr_pull: without pos, out needs one row per row id");
            }
            for (py::ssize_t i = 0; i < n; ++i) {
                if (rows[i] >= cap) throw py::index_error("ctr_pull: row id out of range");
                if (pos && (pos[i] < 0 || pos[i] >= n_out)) throw py::index_error("ctr_pull: position out of range");
            }
            float* v = static_cast<float*>(values.mutable_data());
            py::gil_scoped_release nogil;
            for (py::ssize_t i = 0; i < n; ++i) {
                float* dst = o + (pos ? pos[i] : i) * dim;
                if (rows[i] < 0) {
                    std::fill(dst, dst + dim, 0.0f);
                    continue;
                }
                float* r = v + rows[i] * width;
                std::copy(r, r + dim, dst);
                if (unseen_col >= 0) r[unseen_col] = 0.0f;
            }
        },
        py::arg("values"), py::arg("rows"), py::arg("out"), py::arg("pos"), py::arg("dim"),
        py::arg("unseen_col"),
        "Gather rows' embeddings into out (at pos), zeros for absent rows; reset unseen days if asked.");

    m.def(
        "unique_inverse",
        [](const py::array& keys_any) {
            if (!keys_any.dtype().equal(py::dtype::of<uint64_t>()) || keys_any.ndim() != 1)
                throw py::type_error("unique_inverse needs a 1-D uint64 array of keys");
            auto keys = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(keys_any);
            return shoal::unique_inverse_arrays(keys.data(), static_cast<size_t>(keys.shape(0)));
        },
        py::arg("keys"),
        "(uniq, inverse) with uniq[inverse] == keys, uniq in first-occurrence order; one hashing pass.");

    m.def(
        "gather_add_rows",
        [](py::array out, const py::array& out_idx, const py::array& src, const py::object& src_idx_obj,
           const py::object& scale_obj) {
            // out[out_idx[j]] += scale[j] * src[src_idx[j]] for every j (src_idx None: j itself)
            if (out.ndim() != 2 || src.ndim() != 2 || out.shape(1) != src.shape(1))
                throw py::value_error("gather_add_rows: out and src must be 2-D with the same row width");
            const py::ssize_t d = out.shape(1), n_out = out.shape(0), n_src = src.shape(0);
            float* o = data_of(out, "out", n_out * d);
            const float* sv = cdata_of(src, "src", n_src * d);
            auto idx_of = [](const py::handle& h, const char* what) {
                py::array a = py::reinterpret_borrow<py::array>(h);
                if (!a.dtype().equal(py::dtype::of<int64_t>()) || a.ndim() != 1 || !(a.flags() & py::array::c_style))
                    throw py::type_error(std::string("gather_add_rows: ") + what + " must be a 1-D C-contiguous int64 array");
                return a;
            };
            py::array oi = idx_of(out_idx, "out_idx");
            const py::ssize_t n = oi.shape(0);
            const int64_t* oidx = static_cast<const int64_t*>(oi.data());
            const int64_t* sidx = nullptr;
            py::array si;
            if (!src_idx_obj.is_none()) {
                si = idx_of(src_idx_obj, "src_idx");
                if (si.shape(0) != n) throw py::value_error("gather_add_rows: out_idx and src_idx differ in length");
                sidx = static_cast<const int64_t*>(si.data());
            } else if (n_src != n) {
                throw py::value_error("gather_add_rows: without src_idx, src needs one row per out_idx entry");
            }
            const float* sc = nullptr;
            py::array sca;
            if (!scale_obj.is_none()) {
                sca = py::reinterpret_borrow<py::array>(scale_obj);
                sc = cdata_of(sca, "scale", n);
            }
            for (py::ssize_t j = 0; j < n; ++j) {  // check every index before any write
                if (oidx[j] < 0 || oidx[j] >= n_out || (sidx && (sidx[j] < 0 || sidx[j] >= n_src)))
                    throw py::index_error("gather_add_rows: index " + std::to_string(j) + " out of range");
            }
            py::gil_scoped_release nogil;
            for (py::ssize_t j = 0; j < n; ++j) {
                float* dst = o + oidx[j] * d;
                const float* from = sv + (sidx ? sidx[j] : j) * d;
                if (sc) {
                    const float w = sc[j];
                    for (py::ssize_t c = 0; c < d; ++c) dst[c] += w * from[c];
                } else {
                    for (py::ssize_t c = 0; c < d; ++c) dst[c] += from[c];
                }
            }
        },
        py::arg("out"), py::arg("out_idx"), py::arg("src"), py::arg("src_idx") = py::none(),
        py::arg("scale") = py::none(),
        "out[out_idx[j]] += scale[j] * src[src_idx[j]] in place (float32 rows, int64 indices).");

    m.def(
        "all_finite",
        [](const py::array& a) {
            if (!a.dtype().equal(py::dtype::of<float>()) || !(a.flags() & py::array::c_style))
                throw py::type_error("all_finite needs a C-contiguous float32 array");
            const float* x = static_cast<const float*>(a.data());
            const py::ssize_t n = a.size();
            py::gil_scoped_release nogil;
            // Inf and NaN are the values whose exponent bits are all ones; an integer
            // OR-reduction over that test vectorizes (a float sum would not, without fast-math).
            const uint32_t* bits = reinterpret_cast<const uint32_t*>(x);
            uint32_t bad = 0;
            for (py::ssize_t i = 0; i < n; ++i) bad |= static_cast<uint32_t>((bits[i] & 0x7f800000u) == 0x7f800000u);
            return bad == 0;
        },
        py::arg("array"), "True when every element is finite (one pass, no temporary).");
}

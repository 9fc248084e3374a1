// shoal.worker.data._multislot: Paddle's MultiSlot text format, parsed and written natively.
//
// A line holds, for every slot of the slot list in order, `<count> <values...>`
// separated by spaces or tabs ('\r' counts as a separator, so CRLF files read
// as LF files). Three kinds of slot: a dense float slot (count must equal its
// dim), a sparse float slot and a sparse uint64 slot (count >= 1: Paddle's
// MultiSlotDataFeed refuses empty slots too). Blank lines are skipped and still
// counted, so reported line numbers are the file's.
//
// parse() splits its buffer at newlines into up to n_threads chunks, parses
// them on std::threads (the GIL released) into per-chunk vectors, then copies
// them in order into one numpy array of values per slot (plus int64 offsets
// for a sparse slot). A bad line either stops its chunk (fail mode: the
// earliest bad line over all chunks is reported) or is rolled back and counted
// (skip mode). Ids are parsed as exact uint64 (no float round trip), floats by
// std::from_chars (correctly rounded to float32).
//
// format() is the inverse: slot columns -> the text of their lines, rows
// split over threads.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

enum Kind : int { kSparseU64 = 0, kSparseF32 = 1, kDenseF32 = 2 };

struct SlotSpec {
    Kind kind;
    int64_t dim;  // dense slots only
};

struct BadLine {
    int64_t line;  // 0-based line index within the chunk (then within the buffer)
    int slot;      // slot index, or -1 for a problem of the whole line
    std::string reason;
};

// One chunk's output. Vectors are indexed by slot; a slot uses only the vector of its kind.
struct ChunkResult {
    std::vector<std::vector<uint64_t>> u64;
    std::vector<std::vector<float>> f32;
    std::vector<std::vector<int64_t>> lens;  // sparse slots: values per kept line
    int64_t n_samples = 0;
    int64_t n_lines = 0;
    int64_t n_bad = 0;
    std::vector<BadLine> bad;
    bool stopped = false;
    std::exception_ptr error;
};

inline bool is_sep(char c) { return c == ' ' || c == '\t' || c == '\r'; }

inline const char* skip_sep(const char* p, const char* e) {
    while (p < e && is_sep(*p)) ++p;
    return p;
}

// A token for a message: at most 40 bytes, anything outside printable ASCII
// escaped (the text may not be UTF-8, and a message must be).
std::string show(const char* a, const char* b) {
    static const char* hex = "0123456789abcdef";
    std::string s = "'";
    const char* stop = std::min(b, a + 40);
    for (const char* p = a; p < stop; ++p) {
        unsigned char c = static_cast<unsigned char>(*p);
        if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
            s += static_cast<char>(c);
        } else {
            s += "\\x";
            s += hex[c >> 4];
            s += hex[c & 15];
        }
    }
    if (stop < b) s += "...";
    return s + "'";
}

enum class U64Status { kOk, kNotInteger, kNegative, kOverflow };

inline U64Status parse_u64(const char* a, const char* b, uint64_t& out) {
    if (*a == '-') {
        bool digits = b - a > 1;
        for (const char* p = a + 1; p < b; ++p) digits = digits && (*p >= '0' && *p <= '9');
        return digits ? U64Status::kNegative : U64Status::kNotInteger;
    }
    uint64_t v = 0;
    bool overflow = false;
    for (const char* p = a; p < b; ++p) {
        unsigned d = static_cast<unsigned char>(*p) - '0';
        if (d > 9) return U64Status::kNotInteger;
        if (v > (UINT64_MAX - d) / 10) overflow = true;
        v = v * 10 + d;
    }
    if (overflow) return U64Status::kOverflow;
    out = v;
    return U64Status::kOk;
}

// The common short decimal ("0.42777", "-3", "12.5"): with at most 7 digits
// the mantissa m < 2^24 and 10^k (k <= 7) are exact float32 values, so
// float(double(m) / 10^k) is correctly rounded (an operation on float operands
// done in double and rounded once more is exact: 53 >= 2 * 24 + 2). Anything
// else (exponents, long mantissas) returns false and goes to from_chars.
inline bool fast_f32(const char* a, const char* b, float& out) {
    static const double kPow10[] = {1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7};
    const char* p = a;
    bool neg = false;
    if (*p == '-' || *p == '+') {
        neg = *p == '-';
        ++p;
    }
    uint32_t m = 0;
    int digits = 0, frac = -1;
    for (; p < b; ++p) {
        unsigned d = static_cast<unsigned char>(*p) - '0';
        if (d <= 9) {
            m = m * 10 + d;
            ++digits;
            if (frac >= 0) ++frac;
        } else if (*p == '.' && frac < 0) {
            frac = 0;
        } else {
            return false;
        }
        if (digits > 7) return false;
    }
    if (digits == 0) return false;
    double v = static_cast<double>(m) / kPow10[frac < 0 ? 0 : frac];
    out = static_cast<float>(neg ? -v : v);
    return true;
}

// Empty string: fine. Otherwise why the token [a, b) is not a float32 value.
inline std::string parse_f32(const char* a, const char* b, float& out) {
    if (fast_f32(a, b, out)) return {};
    const char* s = a;
    if (*s == '+' && b - s > 1 && *(s + 1) != '-') ++s;  // from_chars refuses a leading '+'
    auto r = std::from_chars(s, b, out);
    if (r.ec == std::errc::result_out_of_range) return show(a, b) + " is out of float32 range";
    if (r.ec != std::errc() || r.ptr != b) return show(a, b) + " is not a number";
    if (!std::isfinite(out)) return show(a, b) + " is not a finite number";
    return {};
}

class Parser {
public:
    Parser(const std::vector<SlotSpec>& slots, bool skip_bad, size_t keep_examples)
        : slots_(slots), skip_bad_(skip_bad), keep_(keep_examples) {}

    void run(const char* b, const char* e, ChunkResult& r) const {
        size_t n = slots_.size();
        r.u64.resize(n);
        r.f32.resize(n);
        r.lens.resize(n);
        // A MultiSlot line of this kind is rarely shorter than ~2 bytes per value.
        size_t guess_lines = static_cast<size_t>(e - b) / 64 + 16;
        for (size_t s = 0; s < n; ++s) {
            const SlotSpec& sp = slots_[s];
            if (sp.kind == kDenseF32) {
                r.f32[s].reserve(guess_lines * static_cast<size_t>(sp.dim) / 4);
            } else {
                r.lens[s].reserve(guess_lines / 4);
                (sp.kind == kSparseU64 ? static_cast<void>(r.u64[s].reserve(guess_lines / 4))
                                       : static_cast<void>(r.f32[s].reserve(guess_lines / 4)));
            }
        }
        std::vector<size_t> mark_vals(n), mark_lens(n);
        const char* p = b;
        while (p < e) {
            const char* nl = static_cast<const char*>(std::memchr(p, '\n', static_cast<size_t>(e - p)));
            const char* le = nl ? nl : e;
            ++r.n_lines;
            line(p, le, r, mark_vals, mark_lens);
            if (r.stopped) return;
            p = nl ? nl + 1 : e;
        }
    }

private:
    void line(const char* p, const char* e, ChunkResult& r, std::vector<size_t>& mark_vals,
              std::vector<size_t>& mark_lens) const {
        p = skip_sep(p, e);
        if (p == e) return;  // blank line
        const size_t n = slots_.size();
        for (size_t s = 0; s < n; ++s) {
            mark_vals[s] = slots_[s].kind == kSparseU64 ? r.u64[s].size() : r.f32[s].size();
            mark_lens[s] = r.lens[s].size();
        }
        int bad_slot = -1;
        std::string why;
        for (size_t s = 0; s < n && why.empty(); ++s) {
            const SlotSpec& sp = slots_[s];
            bad_slot = static_cast<int>(s);
            p = skip_sep(p, e);
            if (p == e) {
                why = "the line ends before this slot's count";
                break;
            }
            const char* t = p;
            while (p < e && !is_sep(*p)) ++p;
            uint64_t count = 0;
            if (parse_u64(t, p, count) != U64Status::kOk) {
                why = "count " + show(t, p) + " is not a non-negative integer";
                break;
            }
            if (sp.kind == kDenseF32) {
                if (count != static_cast<uint64_t>(sp.dim)) {
                    why = "count " + std::to_string(count) + " but this dense slot has dim " + std::to_string(sp.dim);
                    break;
                }
            } else if (count == 0) {
                why = "count 0: a sparse slot needs at least 1 value (pad it with a default id)";
                break;
            }
            for (uint64_t i = 0; i < count; ++i) {
                p = skip_sep(p, e);
                if (p == e) {
                    why = "count " + std::to_string(count) + " but the line has only " + std::to_string(i) +
                          " value" + (i == 1 ? "" : "s") + " left for this slot";
                    break;
                }
                t = p;
                while (p < e && !is_sep(*p)) ++p;
                if (sp.kind == kSparseU64) {
                    uint64_t v = 0;
                    switch (parse_u64(t, p, v)) {
                        case U64Status::kOk: r.u64[s].push_back(v); break;
                        case U64Status::kNegative: why = "id " + show(t, p) + " is negative"; break;
                        case U64Status::kOverflow: why = "id " + show(t, p) + " does not fit in uint64"; break;
                        case U64Status::kNotInteger: why = "id " + show(t, p) + " is not an unsigned integer"; break;
                    }
                    if (!why.empty()) break;
                } else {
                    float v = 0;
                    why = parse_f32(t, p, v);
                    if (!why.empty()) {
                        why = "value " + why;
                        break;
                    }
                    r.f32[s].push_back(v);
                }
            }
            if (why.empty() && sp.kind != kDenseF32) r.lens[s].push_back(static_cast<int64_t>(count));
        }
        if (why.empty()) {
            p = skip_sep(p, e);
            if (p == e) {
                ++r.n_samples;
                return;
            }
            const char* t = p;
            while (p < e && !is_sep(*p)) ++p;
            bad_slot = -1;
            why = "extra tokens after the last slot, starting with " + show(t, p);
        }
        for (size_t s = 0; s < n; ++s) {
            if (slots_[s].kind == kSparseU64) r.u64[s].resize(mark_vals[s]);
            else r.f32[s].resize(mark_vals[s]);
            r.lens[s].resize(mark_lens[s]);
        }
        ++r.n_bad;
        if (r.bad.size() < keep_) r.bad.push_back({r.n_lines - 1, bad_slot, std::move(why)});
        if (!skip_bad_) r.stopped = true;
    }

    const std::vector<SlotSpec>& slots_;
    bool skip_bad_;
    size_t keep_;
};

// Chunk boundaries: n pieces of about equal size, each ending just after a newline
// (the last at the end of the buffer).
std::vector<std::pair<const char*, const char*>> split(const char* b, const char* e, size_t n) {
    std::vector<std::pair<const char*, const char*>> out;
    const char* start = b;
    size_t size = static_cast<size_t>(e - b);
    for (size_t i = 1; i < n && start < e; ++i) {
        const char* cut = b + size / n * i;
        if (cut < start) cut = start;
        const char* nl = static_cast<const char*>(std::memchr(cut, '\n', static_cast<size_t>(e - cut)));
        if (!nl) break;
        out.emplace_back(start, nl + 1);
        start = nl + 1;
    }
    if (start < e || out.empty()) out.emplace_back(start, e);
    return out;
}

template <class F>
void run_parallel(size_t n, F&& fn) {
    std::vector<std::thread> threads;
    threads.reserve(n > 0 ? n - 1 : 0);
    for (size_t i = 1; i < n; ++i) {
        try {
            threads.emplace_back(fn, i);
        } catch (const std::system_error&) {  // could not start a thread: run its share here
            fn(i);
        }
    }
    if (n > 0) fn(0);
    for (auto& t : threads) t.join();
}

std::vector<SlotSpec> slot_specs(const std::vector<std::tuple<int, int64_t>>& slots) {
    std::vector<SlotSpec> out;
    for (const auto& [kind, dim] : slots) {
        if (kind < kSparseU64 || kind > kDenseF32) throw py::value_error("slot kind must be 0, 1 or 2, got " + std::to_string(kind));
        if (kind == kDenseF32 && dim < 1) throw py::value_error("a dense slot needs dim >= 1, got " + std::to_string(dim));
        out.push_back({static_cast<Kind>(kind), dim});
    }
    if (out.empty()) throw py::value_error("the slot list is empty");
    return out;
}

py::dict parse(const py::buffer& data, const std::vector<std::tuple<int, int64_t>>& slot_list, int n_threads,
               bool skip_bad, int64_t max_examples, int64_t min_chunk_bytes) {
    const std::vector<SlotSpec> slots = slot_specs(slot_list);
    if (n_threads < 1) throw py::value_error("n_threads must be >= 1, got " + std::to_string(n_threads));
    if (min_chunk_bytes < 1) throw py::value_error("min_chunk_bytes must be >= 1");
    py::buffer_info info = data.request();
    if (info.ndim != 1 || info.itemsize != 1 || (info.strides.size() == 1 && info.strides[0] != 1))
        throw py::type_error("parse() needs a contiguous bytes-like buffer (bytes, bytearray, memoryview, mmap)");
    const char* b = static_cast<const char*>(info.ptr);
    const char* e = b + info.size;
    const size_t n_slots = slots.size();

    std::vector<ChunkResult> parts;
    {
        py::gil_scoped_release nogil;
        size_t want = std::max<size_t>(1, static_cast<size_t>(info.size / min_chunk_bytes));
        auto chunks = split(b, e, std::min<size_t>(static_cast<size_t>(n_threads), want));
        parts.resize(chunks.size());
        Parser parser(slots, skip_bad, skip_bad ? static_cast<size_t>(std::max<int64_t>(max_examples, 0)) : 1);
        run_parallel(chunks.size(), [&](size_t i) {
            try {
                parser.run(chunks[i].first, chunks[i].second, parts[i]);
            } catch (...) {
                parts[i].error = std::current_exception();
            }
        });
    }
    for (auto& r : parts)
        if (r.error) std::rethrow_exception(r.error);

    py::dict out;
    py::list bad;
    int64_t n_lines = 0, n_bad = 0, n_samples = 0;
    for (auto& r : parts) {
        for (auto& x : r.bad) {
            if (static_cast<int64_t>(py::len(bad)) < std::max<int64_t>(max_examples, 1))
                bad.append(py::make_tuple(n_lines + x.line, x.slot, x.reason));
        }
        n_bad += r.n_bad;
        n_samples += r.n_samples;
        if (r.stopped) {  // fail mode: the first bad line wins, the rest is not needed
            out["n_lines"] = n_lines + r.n_lines;
            out["n_bad"] = n_bad;
            out["n_samples"] = py::int_(0);
            out["bad"] = bad;
            out["values"] = py::list();
            out["offsets"] = py::list();
            return out;
        }
        n_lines += r.n_lines;
    }

    py::list values, offsets;
    std::vector<void*> dst_vals(n_slots, nullptr);
    std::vector<int64_t*> dst_offs(n_slots, nullptr);
    for (size_t s = 0; s < n_slots; ++s) {
        size_t total = 0;
        for (auto& r : parts) total += slots[s].kind == kSparseU64 ? r.u64[s].size() : r.f32[s].size();
        if (slots[s].kind == kSparseU64) {
            py::array_t<uint64_t> a(static_cast<py::ssize_t>(total));
            dst_vals[s] = a.mutable_data();
            values.append(a);
        } else {
            py::array_t<float> a(static_cast<py::ssize_t>(total));
            dst_vals[s] = a.mutable_data();
            values.append(a);
        }
        if (slots[s].kind == kDenseF32) {
            offsets.append(py::none());
        } else {
            py::array_t<int64_t> o(static_cast<py::ssize_t>(n_samples + 1));
            dst_offs[s] = o.mutable_data();
            offsets.append(o);
        }
    }
    {
        py::gil_scoped_release nogil;
        for (size_t s = 0; s < n_slots; ++s) {
            const bool u64 = slots[s].kind == kSparseU64;
            char* dst = static_cast<char*>(dst_vals[s]);
            int64_t* off = dst_offs[s];
            int64_t acc = 0;
            if (off) *off++ = 0;
            for (auto& r : parts) {
                size_t bytes = u64 ? r.u64[s].size() * sizeof(uint64_t) : r.f32[s].size() * sizeof(float);
                if (bytes) std::memcpy(dst, u64 ? static_cast<const void*>(r.u64[s].data()) : r.f32[s].data(), bytes);
                dst += bytes;
                if (off) {
                    for (int64_t len : r.lens[s]) *off++ = (acc += len);
                }
                std::vector<uint64_t>().swap(r.u64[s]);  // free as we go: peak memory stays near one copy
                std::vector<float>().swap(r.f32[s]);
            }
        }
    }
    out["n_lines"] = n_lines;
    out["n_bad"] = n_bad;
    out["n_samples"] = n_samples;
    out["bad"] = bad;
    out["values"] = values;
    out["offsets"] = offsets;
    return out;
}

// ---- format ----

struct Column {
    Kind kind;
    int64_t dim;
    int decimals;  // float columns: digits after the point, or -1 for the shortest exact form
    const void* values;
    const int64_t* offsets;  // sparse only
};

inline void put_u64(std::string& out, uint64_t v) {
    char buf[24];
    auto r = std::to_chars(buf, buf + sizeof buf, v);
    out.append(buf, r.ptr);
}

inline void put_f32(std::string& out, float v, int decimals) {
    char buf[96];
    std::to_chars_result r = decimals < 0 ? std::to_chars(buf, buf + sizeof buf, v)
                                          : std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed, decimals);
    if (r.ec != std::errc()) {  // beyond the buffer at this precision: the shortest form always fits
        r = std::to_chars(buf, buf + sizeof buf, v);
    }
    out.append(buf, r.ptr);
}

void format_rows(const std::vector<Column>& cols, int64_t lo, int64_t hi, std::string& out) {
    for (int64_t row = lo; row < hi; ++row) {
        bool first = true;
        for (const Column& c : cols) {
            int64_t a, b;
            if (c.kind == kDenseF32) {
                a = row * c.dim;
                b = a + c.dim;
            } else {
                a = c.offsets[row];
                b = c.offsets[row + 1];
            }
            if (!first) out += ' ';
            first = false;
            put_u64(out, static_cast<uint64_t>(b - a));
            for (int64_t i = a; i < b; ++i) {
                out += ' ';
                if (c.kind == kSparseU64) put_u64(out, static_cast<const uint64_t*>(c.values)[i]);
                else put_f32(out, static_cast<const float*>(c.values)[i], c.decimals);
            }
        }
        out += '\n';
    }
}

py::bytes format(const py::list& columns, int64_t n_rows, int n_threads) {
    if (n_threads < 1) throw py::value_error("n_threads must be >= 1, got " + std::to_string(n_threads));
    if (n_rows < 0) throw py::value_error("n_rows must be >= 0");
    std::vector<Column> cols;
    std::vector<py::array> keep;  // owns the contiguous arrays while the GIL is released
    for (const py::handle& h : columns) {
        auto t = h.cast<py::tuple>();
        if (t.size() != 5) throw py::value_error("a column is (kind, values, offsets, dim, decimals)");
        Column c{};
        int kind = t[0].cast<int>();
        if (kind < kSparseU64 || kind > kDenseF32) throw py::value_error("column kind must be 0, 1 or 2");
        c.kind = static_cast<Kind>(kind);
        c.dim = t[3].cast<int64_t>();
        c.decimals = t[4].cast<int>();
        if (c.decimals > 30) throw py::value_error("decimals must be <= 30");
        py::array vals = c.kind == kSparseU64
                             ? py::array(py::array_t<uint64_t, py::array::c_style>::ensure(t[1]))
                             : py::array(py::array_t<float, py::array::c_style>::ensure(t[1]));
        if (!vals) throw py::type_error("column values must be a numpy array");
        if (c.kind == kSparseU64 && !py::array(t[1]).dtype().equal(py::dtype::of<uint64_t>()))
            throw py::type_error("uint64 column values must have dtype uint64");
        if (c.kind != kSparseU64 && !py::array(t[1]).dtype().equal(py::dtype::of<float>()))
            throw py::type_error("float column values must have dtype float32");
        keep.push_back(vals);
        c.values = vals.data();
        if (c.kind == kDenseF32) {
            if (c.dim < 1 || vals.size() != n_rows * c.dim) throw py::value_error("dense column size != n_rows * dim");
        } else {
            auto offs = py::array_t<int64_t, py::array::c_style>::ensure(t[2]);
            if (!offs || offs.size() != n_rows + 1) throw py::value_error("sparse column offsets must be int64 [n_rows + 1]");
            const int64_t* o = offs.data();
            if (o[0] != 0 || o[n_rows] != static_cast<int64_t>(vals.size()))
                throw py::value_error("sparse column offsets must start at 0 and end at len(values)");
            for (int64_t i = 0; i < n_rows; ++i)
                if (o[i + 1] < o[i]) throw py::value_error("sparse column offsets must be non-decreasing");
            keep.push_back(offs);
            c.offsets = o;
        }
        cols.push_back(c);
    }
    size_t n = static_cast<size_t>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_rows / 4096 + 1)));
    std::vector<std::string> parts(n);
    {
        py::gil_scoped_release nogil;
        run_parallel(n, [&](size_t i) {
            int64_t lo = n_rows * static_cast<int64_t>(i) / static_cast<int64_t>(n);
            int64_t hi = n_rows * static_cast<int64_t>(i + 1) / static_cast<int64_t>(n);
            format_rows(cols, lo, hi, parts[i]);
        });
    }
    size_t total = 0;
    for (auto& s : parts) total += s.size();
    PyObject* obj = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(total));
    if (!obj) throw py::error_already_set();
    char* dst = PyBytes_AS_STRING(obj);
    for (auto& s : parts) {
        std::memcpy(dst, s.data(), s.size());
        dst += s.size();
    }
    return py::reinterpret_steal<py::bytes>(obj);
}

}  // namespace

PYBIND11_MODULE(_multislot, m) {
    m.doc() = "Native parser and writer of Paddle's MultiSlot text format (the GIL is released while they run).";
    m.attr("SPARSE_UINT64") = static_cast<int>(kSparseU64);
    m.attr("SPARSE_FLOAT") = static_cast<int>(kSparseF32);
    m.attr("DENSE_FLOAT") = static_cast<int>(kDenseF32);

    m.def("parse", &parse, py::arg("data"), py::arg("slots"), py::arg("n_threads") = 1, py::arg("skip_bad") = false,
          py::arg("max_examples") = 10, py::arg("min_chunk_bytes") = 1 << 20, R"doc(
Parse MultiSlot lines from a bytes-like buffer.

Args:
    data: bytes, bytearray, memoryview or mmap holding whole lines (the last
        one may lack its newline).
    slots: one (kind, dim) per slot in line order; kind SPARSE_UINT64,
        SPARSE_FLOAT or DENSE_FLOAT; dim is the fixed count of a dense slot.
    n_threads: parse with up to this many threads, one chunk each (chunks
        split at newlines, at least min_chunk_bytes each).
    skip_bad: drop and count bad lines instead of stopping at the first.
    max_examples: how many bad lines to describe (skip mode).

Returns:
    dict with n_samples, n_lines (lines seen, blank and bad ones included),
    n_bad, bad (list of (0-based line index, slot index or -1, reason)),
    values (one array per slot: uint64 or float32; a dense slot's is flat
    [n_samples * dim]) and offsets (int64 [n_samples + 1] per sparse slot,
    None for dense). In fail mode with a bad line, values and offsets are
    empty and n_samples is 0.

Thread-safe; the GIL is released while parsing.
)doc");
    m.def("format", &format, py::arg("columns"), py::arg("n_rows"), py::arg("n_threads") = 1, R"doc(
Write rows as MultiSlot text.

Args:
    columns: one (kind, values, offsets, dim, decimals) per slot in line
        order: dense values float32 [n_rows * dim] (offsets None); sparse
        values uint64 or float32 [nnz] with int64 offsets [n_rows + 1].
        decimals: digits after the point for floats, -1 for the shortest
        form that reads back to the same float32.
    n_rows: number of lines.
    n_threads: format row ranges on up to this many threads.

Returns:
    bytes, every line ending with a newline.
)doc");
}

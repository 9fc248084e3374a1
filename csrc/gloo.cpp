// shoal.collective._gloo: the system's Gloo (Debian libgloo-dev) for numpy arrays.
//
// One Context = one gloo tcp device + one fully connected gloo::rendezvous::Context.
// The rendezvous goes through a Python key-value store (any object with set/get/wait),
// wrapped in a gloo::rendezvous::Store whose callbacks take the GIL. Every
// communication runs with the GIL released, straight on the numpy memory, through
// gloo's option-based algorithms; reduce_scatter and send/recv are our own, over
// unbound buffers (this snapshot's ReduceScatterHalvingDoubling overwrites its input,
// misplaces its result and returned garbage at world size 3).
//
// Failures are permanent for a gloo context (a timeout closes every pair), so the
// first failure marks the Context broken and every later call fails at once.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/alltoall.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/common/logging.h>
#include <gloo/gather.h>
#include <gloo/reduce.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/scatter.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>
#include <gloo/types.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "reduce_op.h"

namespace py = pybind11;
using std::chrono::milliseconds;

namespace {

// Module exception types (set once at import; the module lives as long as the process).
PyObject* g_error = nullptr;          // GlooError(RuntimeError)
PyObject* g_timeout_error = nullptr;  // GlooTimeoutError(GlooError)
PyObject* g_io_error = nullptr;       // GlooIoError(GlooError)

// Slot prefixes of our own algorithms; gloo's own collectives use 0x01..0x0f.
constexpr uint8_t kSendRecvSlotPrefix = 0x40;
constexpr uint8_t kReduceScatterSlotPrefix = 0x41;
// BCUBE beats RING below this many bytes on loopback (docs/notes: gloo-binding.md).
constexpr size_t kBcubeMaxBytes = 256 * 1024;

[[noreturn]] void raise_py(PyObject* type, const std::string& msg, py::object cause = py::object()) {
    py::object exc = py::reinterpret_borrow<py::object>(type)(msg);
    if (cause) PyException_SetCause(exc.ptr(), cause.release().ptr());  // steals the reference
    PyErr_SetObject(type, exc.ptr());
    throw py::error_already_set();
}

// ---------------------------------------------------------------- the Python store

// A failure of the Python store inside a gloo callback; carries the kind across gloo's frames.
struct StoreFailure : std::runtime_error {
    StoreFailure(const std::string& msg, bool timeout) : std::runtime_error(msg), timeout(timeout) {}
    bool timeout;
};

class PyStore : public gloo::rendezvous::Store {
  public:
    PyStore(py::object store, milliseconds timeout) : store_(std::move(store)), timeout_(timeout) {}

    ~PyStore() override {
        py::gil_scoped_acquire gil;
        store_ = py::object();
        pending_ = py::object();
    }

    void set(const std::string& key, const std::vector<char>& data) override {
        py::gil_scoped_acquire gil;
        call("set", [&] { store_.attr("set")(key, py::bytes(data.data(), data.size())); });
    }

    std::vector<char> get(const std::string& key) override {
        py::gil_scoped_acquire gil;
        std::vector<char> out;
        call("get", [&] {
            py::object value = store_.attr("get")(key);
            if (!PyBytes_Check(value.ptr())) value = py::reinterpret_steal<py::object>(PyBytes_FromObject(value.ptr()));
            if (!value) throw py::error_already_set();
            char* ptr = nullptr;
            Py_ssize_t len = 0;
            PyBytes_AsStringAndSize(value.ptr(), &ptr, &len);
            out.assign(ptr, ptr + len);
        });
        return out;
    }

    void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }

    void wait(const std::vector<std::string>& keys, const milliseconds& timeout) override {
        py::gil_scoped_acquire gil;
        call("wait", [&] { store_.attr("wait")(py::cast(keys), static_cast<int64_t>(timeout.count())); });
    }

    // The Python exception of the last failed callback (None if none); taken with the GIL held.
    py::object take_pending() { return std::exchange(pending_, py::object()); }

  private:
    template <typename F>
    void call(const char* method, F&& f) {
        try {
            f();
        } catch (py::error_already_set& e) {
            bool timeout = false;
            py::tuple mro = e.type().attr("__mro__");
            for (py::handle cls : mro) {
                if (std::string(py::str(cls.attr("__name__"))).find("Timeout") != std::string::npos) timeout = true;
            }
            pending_ = e.value();
            throw StoreFailure(std::string("store.") + method + " failed: " + e.what(), timeout);
        }
    }

    py::object store_;
    py::object pending_;
    milliseconds timeout_;
};

// ---------------------------------------------------------------- dtypes and reductions

enum class DType { F16, F32, F64, I8, U8, I32, I64 };
const char* kSupportedDtypes = "float16, float32, float64, int8, uint8, int32, int64";

template <typename F>
void dispatch(DType dt, F&& f) {
    switch (dt) {
        case DType::F16: f(gloo::float16{}); break;
        case DType::F32: f(float{}); break;
        case DType::F64: f(double{}); break;
        case DType::I8: f(int8_t{}); break;
        case DType::U8: f(uint8_t{}); break;
        case DType::I32: f(int32_t{}); break;
        case DType::I64: f(int64_t{}); break;
    }
}

using shoal_reduce::Op;
using shoal_reduce::apply;

Op parse_op(const char* opname, const std::string& op) {
    if (op == "sum") return Op::Sum;
    if (op == "max") return Op::Max;
    if (op == "min") return Op::Min;
    if (op == "prod") return Op::Prod;
    throw py::value_error(std::string(opname) + ": unknown op '" + op + "'; expected one of: sum, max, min, prod");
}

template <Op op, typename T>
void reduce_kernel(void* c_, const void* a_, const void* b_, size_t n) {
    T* c = static_cast<T*>(c_);
    const T* a = static_cast<const T*>(a_);
    const T* b = static_cast<const T*>(b_);
    if constexpr (std::is_same_v<T, gloo::float16>) {
        // Each step in float then rounded to half: the result of numpy's float16 arithmetic.
        for (size_t i = 0; i < n; i++) {
            c[i] = gloo::cpu_float2half_rn(apply<op>(gloo::cpu_half2float(a[i]), gloo::cpu_half2float(b[i])));
        }
    } else {
        for (size_t i = 0; i < n; i++) c[i] = apply<op>(a[i], b[i]);
    }
}

using ReduceFn = void (*)(void*, const void*, const void*, size_t);

template <typename T>
ReduceFn reduce_fn(Op op) {
    switch (op) {
        case Op::Sum: return &reduce_kernel<Op::Sum, T>;
        case Op::Max: return &reduce_kernel<Op::Max, T>;
        case Op::Min: return &reduce_kernel<Op::Min, T>;
        case Op::Prod: return &reduce_kernel<Op::Prod, T>;
    }
    return nullptr;
}

// ---------------------------------------------------------------- argument checks

struct Arr {
    py::array array;  // keeps the memory alive while the GIL is released
    void* ptr = nullptr;
    size_t n = 0;
    size_t nbytes = 0;
    size_t itemsize = 0;
    DType dtype = DType::F32;
    std::string dtype_name;
};

Arr check_array(const char* op, const char* name, const py::handle& obj, bool writable) {
    if (!py::isinstance<py::array>(obj)) {
        throw py::type_error(std::string(op) + ": " + name + " must be a numpy.ndarray, got " +
                             std::string(py::str(py::type::of(obj).attr("__name__"))));
    }
    Arr a;
    a.array = py::reinterpret_borrow<py::array>(obj);
    py::dtype dt = a.array.dtype();
    a.dtype_name = py::str(dt);
    const char kind = dt.kind();
    const auto size = dt.itemsize();
    const char order = dt.byteorder();
    bool ok = order == '=' || order == '|';
    if (kind == 'f' && size == 2) a.dtype = DType::F16;
    else if (kind == 'f' && size == 4) a.dtype = DType::F32;
    else if (kind == 'f' && size == 8) a.dtype = DType::F64;
    else if (kind == 'i' && size == 1) a.dtype = DType::I8;
    else if (kind == 'u' && size == 1) a.dtype = DType::U8;
    else if (kind == 'i' && size == 4) a.dtype = DType::I32;
    else if (kind == 'i' && size == 8) a.dtype = DType::I64;
    else ok = false;
    if (!ok) {
        throw py::type_error(std::string(op) + ": " + name + " has unsupported dtype " + a.dtype_name +
                             " (native byte order); supported: " + kSupportedDtypes);
    }
    if (!(a.array.flags() & py::array::c_style)) {
        throw py::value_error(std::string(op) + ": " + name +
                              " is not C-contiguous; pass np.ascontiguousarray(" + name + ")");
    }
    if (writable && !a.array.writeable()) {
        throw py::value_error(std::string(op) + ": " + name + " is read-only, but the result is written into it");
    }
    a.n = static_cast<size_t>(a.array.size());
    a.nbytes = static_cast<size_t>(a.array.nbytes());
    a.itemsize = static_cast<size_t>(size);
    a.ptr = a.n ? const_cast<void*>(a.array.data()) : nullptr;
    return a;
}

void check_same_dtype(const char* op, const Arr& a, const char* aname, const Arr& b, const char* bname) {
    if (a.dtype != b.dtype) {
        throw py::type_error(std::string(op) + ": " + bname + " has dtype " + b.dtype_name + ", expected " +
                             a.dtype_name + " (the dtype of " + aname + ")");
    }
}

void check_no_overlap(const char* op, const Arr& a, const char* aname, const Arr& b, const char* bname) {
    auto lo_a = static_cast<const char*>(a.ptr), lo_b = static_cast<const char*>(b.ptr);
    if (a.nbytes && b.nbytes && lo_a < lo_b + b.nbytes && lo_b < lo_a + a.nbytes) {
        throw py::value_error(std::string(op) + ": " + aname + " and " + bname +
                              " overlap in memory; pass distinct arrays");
    }
}

void check_count(const char* op, const char* name, size_t got, size_t expected, const std::string& what) {
    if (got != expected) {
        throw py::value_error(std::string(op) + ": " + name + " has " + std::to_string(got) + " elements, expected " +
                              what + " = " + std::to_string(expected));
    }
}

bool is_timeout_message(std::string msg) {
    std::transform(msg.begin(), msg.end(), msg.begin(), [](unsigned char c) { return std::tolower(c); });
    return msg.find("timed out") != std::string::npos || msg.find("timeout") != std::string::npos;
}

// ---------------------------------------------------------------- the Context

class GlooContext {
  public:
    GlooContext(py::object store, int rank, int size, const std::string& host, int64_t timeout_ms)
        : rank_(rank), size_(size) {
        if (size < 1) throw py::value_error("Context: size=" + std::to_string(size) + " must be >= 1");
        if (rank < 0 || rank >= size) {
            throw py::value_error("Context: rank=" + std::to_string(rank) + " is out of range [0, " +
                                  std::to_string(size) + ")");
        }
        if (timeout_ms <= 0) {
            throw py::value_error("Context: timeout_ms=" + std::to_string(timeout_ms) + " must be > 0");
        }
        for (const char* method : {"set", "get", "wait"}) {
            if (!py::hasattr(store, method)) {
                throw py::type_error(std::string("Context: store has no method '") + method +
                                     "'; it needs set(key, value), get(key) and wait(keys, timeout_ms)");
            }
        }
        const milliseconds timeout(timeout_ms);
        store_ = std::make_unique<PyStore>(std::move(store), timeout);
        std::string err;
        int kind = 0;
        {
            py::gil_scoped_release nogil;
            try {
                gloo::transport::tcp::attr attr;
                attr.hostname = host;
                device_ = gloo::transport::tcp::CreateDevice(attr);
                auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
                ctx->setTimeout(timeout);
                ctx->connectFullMesh(*store_, device_);
                ctx_ = std::move(ctx);
            } catch (...) {
                kind = classify(std::current_exception(), err);
                ctx_.reset();
                device_.reset();
            }
        }
        if (kind) {
            py::object cause = store_->take_pending();
            store_.reset();
            raise_failure(kind, "Context: rendezvous of rank " + std::to_string(rank) + " of " +
                                    std::to_string(size) + " on " + host + " failed: " + err, cause);
        }
    }

    ~GlooContext() { release(); }

    GlooContext(const GlooContext&) = delete;
    GlooContext& operator=(const GlooContext&) = delete;

    int rank() const { return rank_; }
    int size() const { return size_; }

    int64_t timeout_ms() {
        usable("timeout_ms", false);
        return ctx_->getTimeout().count();
    }

    void set_timeout_ms(int64_t ms) {
        usable("timeout_ms", false);
        if (ms <= 0) throw py::value_error("timeout_ms=" + std::to_string(ms) + " must be > 0");
        ctx_->setTimeout(milliseconds(ms));
    }

    void close() {
        if (busy_) raise_py(g_error, "close: an operation is in progress on another thread; a Context is not thread-safe");
        release();
    }

    std::string repr() const {
        std::string state = closed_ ? "closed" : broken_ ? "broken" : "open";
        return "<shoal.collective._gloo.Context rank=" + std::to_string(rank_) + " size=" + std::to_string(size_) +
               " " + state + ">";
    }

    // ------------------------------------------------------------ collectives

    void allreduce(py::object array, const std::string& opname, const std::string& algorithm, int64_t timeout_ms) {
        const char* op = "allreduce";
        usable(op);
        Arr a = check_array(op, "array", array, true);
        const Op rop = parse_op(op, opname);
        gloo::AllreduceOptions::Algorithm algo;
        if (algorithm == "ring") algo = gloo::AllreduceOptions::Algorithm::RING;
        else if (algorithm == "bcube") algo = gloo::AllreduceOptions::Algorithm::BCUBE;
        else if (algorithm == "auto")
            algo = a.nbytes < kBcubeMaxBytes ? gloo::AllreduceOptions::Algorithm::BCUBE
                                              : gloo::AllreduceOptions::Algorithm::RING;
        else throw py::value_error("allreduce: unknown algorithm '" + algorithm + "'; expected one of: ring, bcube, auto");
        const milliseconds timeout = op_timeout(op, timeout_ms);
        if (a.n == 0 || size_ == 1) return;
        communicate(op, [&] {
            gloo::AllreduceOptions opts(ctx_);
            opts.setTimeout(timeout);
            opts.setAlgorithm(algo);
            dispatch(a.dtype, [&](auto t) {
                using T = decltype(t);
                opts.setOutput<T>(ctx_->createUnboundBuffer(a.ptr, a.nbytes));
                opts.setReduceFunction(reduce_fn<T>(rop));
            });
            gloo::allreduce(opts);
        });
    }

    void allgather(py::object input, py::object output, int64_t timeout_ms) {
        const char* op = "allgather";
        usable(op);
        Arr in = check_array(op, "input", input, false);
        Arr out = check_array(op, "output", output, true);
        check_same_dtype(op, in, "input", out, "output");
        check_count(op, "output", out.n, in.n * size_, "size*input");
        check_no_overlap(op, in, "input", out, "output");
        const milliseconds timeout = op_timeout(op, timeout_ms);
        if (in.n == 0) return;
        if (size_ == 1) return (void)std::memcpy(out.ptr, in.ptr, in.nbytes);
        communicate(op, [&] {
            gloo::AllgatherOptions opts(ctx_);
            opts.setTimeout(timeout);
            opts.setInput<uint8_t>(ctx_->createUnboundBuffer(in.ptr, in.nbytes));
            opts.setOutput<uint8_t>(ctx_->createUnboundBuffer(out.ptr, out.nbytes));
            gloo::allgather(opts);
        });
    }

    void broadcast(py::object array, int root, int64_t timeout_ms) {
        const char* op = "broadcast";
        usable(op);
        Arr a = check_array(op, "array", array, true);
        check_rank(op, "root", root);
        const milliseconds timeout = op_timeout(op, timeout_ms);
        if (a.n == 0 || size_ == 1) return;
        communicate(op, [&] {
            gloo::BroadcastOptions opts(ctx_);
            opts.setTimeout(timeout);
            opts.setRoot(root);
            opts.setOutput<uint8_t>(ctx_->createUnboundBuffer(a.ptr, a.nbytes));
            gloo::broadcast(opts);
        });
    }

    void reduce(py::object array, int root, const std::string& opname, int64_t timeout_ms) {
        const char* op = "reduce";
        usable(op);
        Arr a = check_array(op, "array", array, true);
        check_rank(op, "root", root);
        const Op rop = parse_op(op, opname);
        const milliseconds timeout = op_timeout(op, timeout_ms);
        if (a.n == 0 || size_ == 1) return;
        communicate(op, [&] {
            // Non-roots reduce into scratch memory so that their array stays unchanged
            // (gloo's ring would leave partial reductions in it).
            std::unique_ptr<uint8_t[]> scratch;
            gloo::ReduceOptions opts(ctx_);
            opts.setTimeout(timeout);
            opts.setRoot(root);
            dispatch(a.dtype, [&](auto t) {
                using T = decltype(t);
                if (rank_ == root) {
                    opts.setOutput<T>(ctx_->createUnboundBuffer(a.ptr, a.nbytes));
                } else {
                    scratch.reset(new uint8_t[a.nbytes]);
                    opts.setInput<T>(ctx_->createUnboundBuffer(a.ptr, a.nbytes));
                    opts.setOutput<T>(ctx_->createUnboundBuffer(scratch.get(), a.nbytes));
                }
                opts.setReduceFunction(reduce_fn<T>(rop));
            });
            gloo::reduce(opts);
        });
    }

    void gather(py::object input, py::object output, int root, int64_t timeout_ms) {
        const char* op = "gather";
        usable(op);
        Arr in = check_array(op, "input", input, false);
        check_rank(op, "root", root);
        Arr out;
        if (rank_ == root) {
            if (output.is_none()) throw py::value_error("gather: output is required at the root (rank " + std::to_string(root) + ")");
            out = check_array(op, "output", output, true);
            check_same_dtype(op, in, "input", out, "output");
            check_count(op, "output", out.n, in.n * size_, "size*input");
            check_no_overlap(op, in, "input", out, "output");
        } else if (!output.is_none()) {
            throw py::value_error("gather: output must be None on rank " + std::to_string(rank_) +
                                  " (only the root, rank " + std::to_string(root) + ", receives)");
        }
        const milliseconds timeout = op_timeout(op, timeout_ms);
        if (in.n == 0) return;
        if (size_ == 1) return (void)std::memcpy(out.ptr, in.ptr, in.nbytes);
        communicate(op, [&] {
            gloo::GatherOptions opts(ctx_);
            opts.setTimeout(timeout);
            opts.setRoot(root);
            opts.setInput<uint8_t>(ctx_->createUnboundBuffer(in.ptr, in.nbytes));
            if (rank_ == root) opts.setOutput<uint8_t>(ctx_->createUnboundBuffer(out.ptr, out.nbytes));
            gloo::gather(opts);
        });
    }

    void scatter(py::object inputs, py::object output, int root, int64_t timeout_ms) {
        const char* op = "scatter";
        usable(op);
        Arr out = check_array(op, "output", output, true);
        check_rank(op, "root", root);
        std::vector<Arr> ins;
        if (rank_ == root) {
            if (inputs.is_none() || !py::isinstance<py::sequence>(inputs) || py::isinstance<py::array>(inputs)) {
                throw py::type_error("scatter: inputs must be a list of " + std::to_string(size_) +
                                     " numpy arrays at the root (rank " + std::to_string(root) + ")");
            }
            py::sequence seq = inputs;
            if (static_cast<int>(py::len(seq)) != size_) {
                throw py::value_error("scatter: inputs has " + std::to_string(py::len(seq)) +
                                      " arrays, expected size = " + std::to_string(size_));
            }
            for (int i = 0; i < size_; i++) {
                const std::string name = "inputs[" + std::to_string(i) + "]";
                ins.push_back(check_array(op, name.c_str(), seq[i], false));
                check_same_dtype(op, out, "output", ins.back(), name.c_str());
                check_count(op, name.c_str(), ins.back().n, out.n, "output.size");
                check_no_overlap(op, ins.back(), name.c_str(), out, "output");
            }
        } else if (!inputs.is_none()) {
            throw py::value_error("scatter: inputs must be None on rank " + std::to_string(rank_) +
                                  " (only the root, rank " + std::to_string(root) + ", sends)");
        }
        const milliseconds timeout = op_timeout(op, timeout_ms);
        if (out.n == 0) return;
        if (size_ == 1) return (void)std::memcpy(out.ptr, ins[0].ptr, out.nbytes);
        communicate(op, [&] {
            gloo::ScatterOptions opts(ctx_);
            opts.setTimeout(timeout);
            opts.setRoot(root);
            if (rank_ == root) {
                std::vector<std::unique_ptr<gloo::transport::UnboundBuffer>> bufs;
                for (auto& a : ins) bufs.push_back(ctx_->createUnboundBuffer(a.ptr, a.nbytes));
                opts.setInputs<uint8_t>(std::move(bufs));
            }
            opts.setOutput<uint8_t>(ctx_->createUnboundBuffer(out.ptr, out.nbytes));
            gloo::scatter(opts);
        });
    }

    void alltoall(py::object input, py::object output, int64_t timeout_ms) {
        const char* op = "alltoall";
        usable(op);
        Arr in = check_array(op, "input", input, false);
        Arr out = check_array(op, "output", output, true);
        check_same_dtype(op, in, "input", out, "output");
        check_count(op, "output", out.n, in.n, "input.size");
        if (in.n % size_ != 0) {
            throw py::value_error("alltoall: input has " + std::to_string(in.n) +
                                  " elements, not divisible by size = " + std::to_string(size_));
        }
        check_no_overlap(op, in, "input", out, "output");
        const milliseconds timeout = op_timeout(op, timeout_ms);
        if (in.n == 0) return;
        if (size_ == 1) return (void)std::memcpy(out.ptr, in.ptr, in.nbytes);
        communicate(op, [&] {
            gloo::AlltoallOptions opts(ctx_);
            opts.setTimeout(timeout);
            opts.setInput<uint8_t>(ctx_->createUnboundBuffer(in.ptr, in.nbytes));
            opts.setOutput<uint8_t>(ctx_->createUnboundBuffer(out.ptr, out.nbytes));
            gloo::alltoall(opts);
        });
    }

    void reduce_scatter(py::object input, py::object output, const std::string& opname, int64_t timeout_ms) {
        const char* op = "reduce_scatter";
        usable(op);
        Arr in = check_array(op, "input", input, false);
        Arr out = check_array(op, "output", output, true);
        check_same_dtype(op, out, "output", in, "input");
        check_count(op, "input", in.n, out.n * size_, "size*output");
        check_no_overlap(op, in, "input", out, "output");
        const Op rop = parse_op(op, opname);
        const milliseconds timeout = op_timeout(op, timeout_ms);
        if (out.n == 0) return;
        if (size_ == 1) return (void)std::memcpy(out.ptr, in.ptr, out.nbytes);
        communicate(op, [&] {
            ReduceFn fn = nullptr;
            dispatch(in.dtype, [&](auto t) { fn = reduce_fn<decltype(t)>(rop); });
            ring_reduce_scatter(in, out, fn, timeout);
        });
    }

    void barrier(int64_t timeout_ms) {
        const char* op = "barrier";
        usable(op);
        const milliseconds timeout = op_timeout(op, timeout_ms);
        if (size_ == 1) return;
        communicate(op, [&] {
            gloo::BarrierOptions opts(ctx_);
            opts.setTimeout(timeout);
            gloo::barrier(opts);
        });
    }

    void send(py::object array, int dst, int64_t tag, int64_t timeout_ms) {
        const char* op = "send";
        usable(op);
        Arr a = check_array(op, "array", array, false);
        check_peer(op, "dst", dst);
        const uint64_t slot = p2p_slot(op, tag);
        const milliseconds timeout = op_timeout(op, timeout_ms);
        if (a.n == 0) return;
        communicate(op, [&] {
            auto buf = ctx_->createUnboundBuffer(a.ptr, a.nbytes);
            buf->send(dst, slot, 0, a.nbytes);
            if (!buf->waitSend(timeout)) throw std::runtime_error("send was aborted");
        });
    }

    void recv(py::object array, int src, int64_t tag, int64_t timeout_ms) {
        const char* op = "recv";
        usable(op);
        Arr a = check_array(op, "array", array, true);
        check_peer(op, "src", src);
        const uint64_t slot = p2p_slot(op, tag);
        const milliseconds timeout = op_timeout(op, timeout_ms);
        if (a.n == 0) return;
        communicate(op, [&] {
            auto buf = ctx_->createUnboundBuffer(a.ptr, a.nbytes);
            buf->recv(src, slot, 0, a.nbytes);
            if (!buf->waitRecv(timeout)) throw std::runtime_error("recv was aborted");
        });
    }

  private:
    enum Kind : int { kNone = 0, kGeneric = 1, kTimeout = 2, kIo = 3 };

    // Raises if the context is closed, broken, or busy on another thread.
    void usable(const char* op, bool check_broken = true) {
        if (closed_) raise_py(g_error, std::string(op) + ": context is closed");
        if (busy_) {
            raise_py(g_error, std::string(op) +
                               ": another operation is in progress on this context; a Context is not "
                               "thread-safe, issue its calls from one thread");
        }
        if (check_broken && broken_) {
            raise_py(g_error, "gloo context is broken by an earlier failure: " + broken_msg_ +
                               "; create a new context (a new rendezvous)");
        }
    }

    milliseconds op_timeout(const char* op, int64_t timeout_ms) const {
        if (timeout_ms < 0) {
            throw py::value_error(std::string(op) + ": timeout_ms=" + std::to_string(timeout_ms) +
                                  " must be >= 0 (0 = the context's timeout)");
        }
        return timeout_ms == 0 ? ctx_->getTimeout() : milliseconds(timeout_ms);
    }

    void check_rank(const char* op, const char* name, int r) const {
        if (r < 0 || r >= size_) {
            throw py::value_error(std::string(op) + ": " + name + "=" + std::to_string(r) + " is out of range [0, " +
                                  std::to_string(size_) + ")");
        }
    }

    void check_peer(const char* op, const char* name, int r) const {
        check_rank(op, name, r);
        if (r == rank_) {
            throw py::value_error(std::string(op) + ": " + name + "=" + std::to_string(r) +
                                  " is this rank; point-to-point needs another rank");
        }
    }

    static uint64_t p2p_slot(const char* op, int64_t tag) {
        if (tag < 0 || tag > 0xffffffffLL) {
            throw py::value_error(std::string(op) + ": tag=" + std::to_string(tag) + " is out of range [0, 2**32)");
        }
        return gloo::Slot::build(kSendRecvSlotPrefix, static_cast<uint32_t>(tag));
    }

    static int classify(std::exception_ptr ep, std::string& msg) {
        try {
            std::rethrow_exception(ep);
        } catch (const StoreFailure& e) {
            msg = e.what();
            return e.timeout ? kTimeout : kGeneric;
        } catch (const gloo::IoException& e) {
            msg = e.what();
            return is_timeout_message(msg) ? kTimeout : kIo;
        } catch (const gloo::EnforceNotMet& e) {
            msg = e.what();
            return kGeneric;
        } catch (const std::exception& e) {
            msg = e.what();
            return is_timeout_message(msg) ? kTimeout : kGeneric;
        } catch (...) {
            msg = "unknown C++ exception";
            return kGeneric;
        }
    }

    [[noreturn]] static void raise_failure(int kind, const std::string& msg, py::object cause = py::object()) {
        // A KeyboardInterrupt (or another BaseException) raised inside the store goes through unchanged.
        if (cause && !PyObject_IsInstance(cause.ptr(), PyExc_Exception)) {
            PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(cause.ptr())), cause.ptr());
            throw py::error_already_set();
        }
        PyObject* type = kind == kTimeout ? g_timeout_error : kind == kIo ? g_io_error : g_error;
        raise_py(type, msg, std::move(cause));
    }

    // Runs f with the GIL released; any failure marks the context broken and raises.
    template <typename F>
    void communicate(const char* op, F&& f) {
        std::string err;
        int kind = kNone;
        busy_ = true;
        {
            py::gil_scoped_release nogil;
            try {
                f();
            } catch (...) {
                kind = classify(std::current_exception(), err);
            }
        }
        busy_ = false;
        if (kind) {
            const std::string msg = std::string(op) + " failed: " + err;
            broken_ = true;
            broken_msg_ = msg;
            raise_failure(kind, msg);
        }
    }

    // Ring reduce-scatter. At step s (0..n-2) rank r sends its partial block (r-s-1) to r+1
    // and receives the partial block (r-s-2) from r-1, reducing its own input block into it;
    // after the last step it holds block r reduced over all ranks (received straight into
    // output). Step 0 sends from the input, later steps from the block reduced one step
    // before, so the input is never written and the scratch is three blocks. Each block
    // travels as segments: segment j of step s+1 is sent as soon as segment j of step s is
    // reduced, which overlaps the reductions with the transfers. Messages of one slot from
    // one peer complete in the order they were posted (one TCP connection per pair), so the
    // k-th waitRecv on a buffer is its k-th segment.
    void ring_reduce_scatter(const Arr& in, const Arr& out, ReduceFn fn, milliseconds timeout) {
        constexpr size_t kMaxSegmentBytes = 1 << 20;
        const int n = size_;
        const size_t blk = out.nbytes, esize = out.itemsize;
        // Whole elements per segment, at least two segments a block when the block allows.
        const size_t seg_elems = std::max<size_t>(
            1, std::min((out.n + 1) / 2, kMaxSegmentBytes / esize));
        const size_t seg = seg_elems * esize;
        const size_t nseg = (blk + seg - 1) / seg;
        auto seg_len = [&](size_t j) { return std::min(seg, blk - j * seg); };

        const auto deadline = std::chrono::steady_clock::now() + timeout;
        auto remaining = [&] {
            auto left = std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
            return std::max(left, milliseconds(1));
        };
        auto block_of = [&](int b) { return static_cast<size_t>(((b % n) + n) % n); };
        auto slot_of = [](int step) { return gloo::Slot::build(kReduceScatterSlotPrefix, static_cast<uint32_t>(step)); };

        const int steps = n - 1, next = (rank_ + 1) % n, prev = (rank_ + n - 1) % n;
        const int nacc = std::min(steps - 1, 3);  // the last step receives into output
        std::unique_ptr<uint8_t[]> scratch(new uint8_t[std::max(nacc, 1) * blk]);
        std::vector<std::unique_ptr<gloo::transport::UnboundBuffer>> acc;
        for (int i = 0; i < nacc; i++) acc.push_back(ctx_->createUnboundBuffer(scratch.get() + i * blk, blk));
        auto inbuf = ctx_->createUnboundBuffer(in.ptr, in.nbytes);
        auto outbuf = ctx_->createUnboundBuffer(out.ptr, blk);
        const uint8_t* input = static_cast<const uint8_t*>(in.ptr);

        auto target = [&](int s) { return s == steps - 1 ? outbuf.get() : acc[s % 3].get(); };
        auto post_recvs = [&](int s) {
            for (size_t j = 0; j < nseg; j++) target(s)->recv(prev, slot_of(s), j * seg, seg_len(j));
        };
        auto wait = [](bool ok, const char* what) {
            if (!ok) throw std::runtime_error(std::string("reduce_scatter ") + what + " was aborted");
        };

        post_recvs(0);
        if (steps > 1) post_recvs(1);
        const size_t first = block_of(rank_ - 1) * blk;
        for (size_t j = 0; j < nseg; j++) inbuf->send(next, slot_of(0), first + j * seg, seg_len(j));
        for (int s = 0; s < steps; s++) {
            gloo::transport::UnboundBuffer* t = target(s);
            const uint8_t* own = input + block_of(rank_ - s - 2) * blk;
            for (size_t j = 0; j < nseg; j++) {
                wait(t->waitRecv(remaining()), "recv");
                uint8_t* dst = static_cast<uint8_t*>(t->ptr) + j * seg;
                fn(dst, dst, own + j * seg, seg_len(j) / esize);
                if (s + 1 < steps) t->send(next, slot_of(s + 1), j * seg, seg_len(j));
            }
            // This step's sends went out of the buffer that step s+2 receives into.
            gloo::transport::UnboundBuffer* source = s == 0 ? inbuf.get() : acc[(s - 1) % 3].get();
            for (size_t j = 0; j < nseg; j++) wait(source->waitSend(remaining()), "send");
            if (s + 2 < steps) post_recvs(s + 2);
        }
    }

    // Drops the gloo context and device (closing every pair and the device's epoll thread).
    void release() {
        closed_ = true;
        if (ctx_ || device_) {
            const bool have_gil = PyGILState_Check();
            if (have_gil) {
                py::gil_scoped_release nogil;
                ctx_.reset();
                device_.reset();
            } else {
                ctx_.reset();
                device_.reset();
            }
        }
        store_.reset();  // PyStore takes the GIL itself
    }

    int rank_;
    int size_;
    std::shared_ptr<gloo::transport::Device> device_;
    std::shared_ptr<gloo::rendezvous::Context> ctx_;
    std::unique_ptr<PyStore> store_;
    bool broken_ = false;
    std::string broken_msg_;
    bool closed_ = false;
    bool busy_ = false;  // read and written with the GIL held
};

}  // namespace

PYBIND11_MODULE(_gloo, m) {
    m.doc() = R"doc(Gloo collectives over numpy arrays (the system's libgloo, TCP transport).

``Context(store, rank, size, host, timeout_ms)`` rendezvouses ``size`` processes through
``store`` (any object with ``set(key, value: bytes)``, ``get(key) -> bytes`` blocking until
the key exists, and ``wait(keys, timeout_ms)`` raising on timeout; keys are used as given, so
prefix them per group) and connects every pair of ranks over TCP on ``host``.

Every operation works in place on C-contiguous numpy arrays of dtype float16, float32,
float64, int8, uint8, int32 or int64, checks its arguments (ValueError/TypeError) before any
communication, releases the GIL while it communicates, and takes ``timeout_ms`` (0: the
context's timeout). Zero-element arrays and world size 1 need no communication (send and
recv need a peer, so at world size 1 they have no valid dst/src). A call blocks until it
completes or times out, also for Ctrl-C (the signal is seen when it returns). send completes
only once the receiver has posted the matching recv (same tag), so order sends and recvs so
that no two ranks both send first to each other.

Errors: GlooError(RuntimeError); GlooTimeoutError (an operation or the rendezvous timed out);
GlooIoError (a peer closed its connection, ...). A gloo context cannot recover from a failed
operation: after the first failure every call raises GlooError ("... broken ...") at once;
create a new Context under a new store prefix.

Thread safety: a Context is NOT thread-safe. Issue all its calls from one thread (the
caller serializes); two threads running collectives on one gloo context silently produce
different results on different ranks. A call made while another is in progress on the same
Context raises GlooError. Use one Context per concurrent stream of collectives.

Processes: the tcp device runs an epoll thread, so never fork after creating a Context
(start ranks with multiprocessing's "spawn"). torch exports its own gloo symbols: harmless
under the default RTLD_LOCAL, but with TORCH_USE_RTLD_GLOBAL=1 calls may bind to torch's copy.
)doc";

    g_error = PyErr_NewExceptionWithDoc("shoal.collective._gloo.GlooError",
                                        "A Gloo operation or rendezvous failed.", PyExc_RuntimeError, nullptr);
    g_timeout_error = PyErr_NewExceptionWithDoc("shoal.collective._gloo.GlooTimeoutError",
                                                "A Gloo operation or the rendezvous hit its timeout.", g_error, nullptr);
    g_io_error = PyErr_NewExceptionWithDoc("shoal.collective._gloo.GlooIoError",
                                           "A Gloo connection failed (e.g. a peer closed it).", g_error, nullptr);
    if (!g_error || !g_timeout_error || !g_io_error) throw py::error_already_set();
    // The module keeps one reference each; the globals borrow (the module is never unloaded).
    m.attr("GlooError") = py::reinterpret_borrow<py::object>(g_error);
    m.attr("GlooTimeoutError") = py::reinterpret_borrow<py::object>(g_timeout_error);
    m.attr("GlooIoError") = py::reinterpret_borrow<py::object>(g_io_error);

    py::class_<GlooContext>(m, "Context", R"doc(A fully connected Gloo group of ``size`` ranks.

Context(store, rank, size, host, timeout_ms) blocks until every rank has joined (or raises
GlooTimeoutError after about ``timeout_ms``). Not thread-safe: one issuing thread.)doc")
        .def(py::init<py::object, int, int, const std::string&, int64_t>(), py::arg("store"), py::arg("rank"),
             py::arg("size"), py::arg("host"), py::arg("timeout_ms"))
        .def_property_readonly("rank", &GlooContext::rank)
        .def_property_readonly("size", &GlooContext::size)
        .def_property("timeout_ms", &GlooContext::timeout_ms, &GlooContext::set_timeout_ms,
                      "The default timeout of every operation, in milliseconds (> 0).")
        .def("allreduce", &GlooContext::allreduce, py::arg("array"), py::arg("op") = "sum",
             py::arg("algorithm") = "auto", py::arg("timeout_ms") = 0,
             "In place: array = op over ranks (op: sum, max, min, prod). algorithm: ring, bcube or "
             "auto (bcube below 256 KiB, ring from there).")
        .def("allgather", &GlooContext::allgather, py::arg("input"), py::arg("output"), py::arg("timeout_ms") = 0,
             "output (size*input.size elements) receives rank r's input at block r.")
        .def("broadcast", &GlooContext::broadcast, py::arg("array"), py::arg("root"), py::arg("timeout_ms") = 0,
             "In place: every rank's array becomes root's.")
        .def("reduce", &GlooContext::reduce, py::arg("array"), py::arg("root"), py::arg("op") = "sum",
             py::arg("timeout_ms") = 0,
             "In place at root: array = op over ranks. Other ranks' arrays are left unchanged.")
        .def("gather", &GlooContext::gather, py::arg("input"), py::arg("output"), py::arg("root"),
             py::arg("timeout_ms") = 0,
             "At root, output (size*input.size elements) receives rank r's input at block r; "
             "output must be None on the other ranks.")
        .def("scatter", &GlooContext::scatter, py::arg("inputs"), py::arg("output"), py::arg("root"),
             py::arg("timeout_ms") = 0,
             "Rank r's output receives root's inputs[r]; inputs (size arrays shaped like output) at root, "
             "None elsewhere.")
        .def("alltoall", &GlooContext::alltoall, py::arg("input"), py::arg("output"), py::arg("timeout_ms") = 0,
             "Block j of rank i's input lands at block i of rank j's output (size equal blocks).")
        .def("reduce_scatter", &GlooContext::reduce_scatter, py::arg("input"), py::arg("output"),
             py::arg("op") = "sum", py::arg("timeout_ms") = 0,
             "Rank r's output = op over ranks of block r of input (size*output.size elements); input unchanged.")
        .def("barrier", &GlooContext::barrier, py::arg("timeout_ms") = 0, "Returns once every rank has entered it.")
        .def("send", &GlooContext::send, py::arg("array"), py::arg("dst"), py::arg("tag") = 0,
             py::arg("timeout_ms") = 0,
             "Sends array to rank dst; blocks until dst has posted the matching recv (same tag) and the "
             "data is handed over.")
        .def("recv", &GlooContext::recv, py::arg("array"), py::arg("src"), py::arg("tag") = 0,
             py::arg("timeout_ms") = 0,
             "Receives into array (the sender's array must have the same number of bytes) from rank src; "
             "blocks until complete.")
        .def("close", &GlooContext::close, "Releases the connections and the device (idempotent).")
        .def("__repr__", &GlooContext::repr);
}

// shoal.collective._shm: collectives through one POSIX shared-memory segment, for the ranks of
// a process group that all run on one host (the gloo group uses it instead of TCP loopback).
//
// Layout of a segment of `world` ranks and chunk size C:
//   Header (64 B) | world x Line (64 B each: this rank's arrival counter, the count of ranks
//   sleeping on it, its pid, a descriptor of the operation it is in) | padding to 4 KiB |
//   2 sets x world slots of C bytes (double buffered: set = chunk number % 2).
//
// all_reduce, per chunk of at most C bytes: copy the partitions of the peers (each rank owns
// 1/world of the chunk, 64-byte aligned) into this rank's slot; arrive and wait for every rank
// (all slots filled); reduce this rank's partition across every rank's data (its own read
// from the caller's array), in rank order, into the array and this rank's slot; arrive and
// wait (every partition reduced); copy the peers' partitions' results out of their slots. The next
// chunk uses the other set of slots, so no third barrier is needed: a rank writes a set again
// only after it saw every peer arrive at the first barrier of the chunk in between, which each
// peer reaches after it finished copying out of that set.
//
// Arrival = a release store of the next epoch into this rank's counter (+ a futex wake when a
// peer sleeps on it). Waiting = spin with pause, then sched_yield, then futex waits of at most
// 2 ms, each followed by a check of the deadline (ShmTimeoutError) and of the awaited peer's
// pid (ShmPeerError when it is gone or a zombie). The caller releases the GIL for the whole
// operation. A failed operation leaves the segment's epochs out of step: the group is broken
// after it (the Python side enforces it) and must not use the segment again.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <vector>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <mutex>
#include <string>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SHOAL_PAUSE() _mm_pause()
#else
#define SHOAL_PAUSE() std::atomic_signal_fence(std::memory_order_seq_cst)
#endif

#include "reduce_op.h"

namespace py = pybind11;
using Clock = std::chrono::steady_clock;

namespace {

constexpr uint64_t kMagic = 0x73686f616c73686dULL;  // "shoalshm"
constexpr size_t kLine = 64;
// How long a wait spins adapts: a peer running on another core arrives within the spin, and
// once it stops spinning the core may go to another process for milliseconds (a nice'd busy
// loop took it for 3-10 ms per all-reduce inside a training step), so a spin that succeeds is
// doubled, up to kSpinsMax (~0.5 ms). On an oversubscribed machine the peer often shares this
// core and spinning only delays it (a 20 us spin made every barrier cost 20 us): a spin that
// runs out is quartered, down to kSpinsMin (~2.5 us), then the wait yields for up to 100 us and
// sleeps.
constexpr int kSpinsMin = 256;
constexpr int kSpinsMax = 65536;
constexpr int kYieldUs = 100;
constexpr size_t kTile = 16 << 10;  // bytes reduced per step of a partition (fits L1)
constexpr long kSleepNs = 2'000'000;  // futex waits of at most 2 ms between deadline checks

struct ShmError : std::runtime_error { using std::runtime_error::runtime_error; };
struct ShmTimeout : ShmError { using ShmError::ShmError; };
struct ShmPeerFailed : ShmError { using ShmError::ShmError; };
struct ShmMismatch : ShmError { using ShmError::ShmError; };

struct Header {
    uint64_t magic;
    uint32_t world;
    uint32_t pad0;
    uint64_t chunk_bytes;
    uint64_t total_bytes;
    char pad[kLine - 32];
};
static_assert(sizeof(Header) == kLine);

struct Line {
    std::atomic<uint32_t> seq;      // the last epoch this rank arrived at (a futex word)
    std::atomic<uint32_t> waiters;  // ranks sleeping in a futex wait on `seq`
    std::atomic<int32_t> pid;
    // The operation this rank is in (kind, dtype, op or root) and its size, by the parity of
    // its count of operations: after a one-barrier operation a peer may already describe the
    // next one while this rank still checks the last (never two ahead: each needs this rank).
    uint32_t op_code[2];
    uint32_t pad0;
    uint64_t op_bytes[2];
    char pad[kLine - 40];
};
static_assert(sizeof(Line) == kLine);
static_assert(std::atomic<uint32_t>::is_always_lock_free);

long futex(std::atomic<uint32_t>* addr, int op, uint32_t val, const timespec* ts) {
    // not FUTEX_PRIVATE: the word is shared between processes
    return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, val, ts, nullptr, 0);
}

bool reached(uint32_t value, uint32_t target) { return static_cast<int32_t>(value - target) >= 0; }

// True while `pid` names a live process (a zombie is dead: its parent has not reaped it yet).
bool alive(int32_t pid) {
    if (pid <= 0) return true;  // not attached yet: nothing to say
    if (kill(pid, 0) != 0 && errno == ESRCH) return false;
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    auto close = s.rfind(')');
    if (close == std::string::npos || close + 2 >= s.size()) return true;
    char state = s[close + 2];
    return state != 'Z' && state != 'X';
}

// ---------------------------------------------------------------- dtypes and reductions

enum class DType : uint32_t { F16, F32, F64, I8, U8, I32, I64 };
using shoal_reduce::Op;
using shoal_reduce::apply;
enum class Kind : uint32_t { AllReduce = 1, Broadcast = 2, AllGather = 3 };

const char* kDtypes = "float16, float32, float64, int8, uint8, int32, int64";

// d[i] = a[i] op b[i] (acc: d[i] = d[i] op b[i]) over distinct buffers, so the loops vectorize.
template <Op op, typename T>
void kernel3(void* __restrict d_, const void* __restrict a_, const void* __restrict b_, size_t n) {
    if constexpr (std::is_same_v<T, uint16_t>) {  // float16: each step in float, rounded to half
        auto* __restrict d = static_cast<_Float16*>(d_);
        const auto* __restrict a = static_cast<const _Float16*>(a_);
        const auto* __restrict b = static_cast<const _Float16*>(b_);
        for (size_t i = 0; i < n; i++)
            d[i] = static_cast<_Float16>(apply<op, float>(static_cast<float>(a[i]), static_cast<float>(b[i])));
    } else {
        T* __restrict d = static_cast<T*>(d_);
        const T* __restrict a = static_cast<const T*>(a_);
        const T* __restrict b = static_cast<const T*>(b_);
        for (size_t i = 0; i < n; i++) d[i] = apply<op>(a[i], b[i]);
    }
}

template <Op op, typename T>
void kernel_acc(void* __restrict d_, const void* __restrict b_, size_t n) {
    if constexpr (std::is_same_v<T, uint16_t>) {
        auto* __restrict d = static_cast<_Float16*>(d_);
        const auto* __restrict b = static_cast<const _Float16*>(b_);
        for (size_t i = 0; i < n; i++)
            d[i] = static_cast<_Float16>(apply<op, float>(static_cast<float>(d[i]), static_cast<float>(b[i])));
    } else {
        T* __restrict d = static_cast<T*>(d_);
        const T* __restrict b = static_cast<const T*>(b_);
        for (size_t i = 0; i < n; i++) d[i] = apply<op>(d[i], b[i]);
    }
}

struct Kernels {
    void (*three)(void*, const void*, const void*, size_t);
    void (*acc)(void*, const void*, size_t);
};

template <typename T>
Kernels kernels_for(Op op) {
    switch (op) {
        case Op::Sum: return {&kernel3<Op::Sum, T>, &kernel_acc<Op::Sum, T>};
        case Op::Max: return {&kernel3<Op::Max, T>, &kernel_acc<Op::Max, T>};
        case Op::Min: return {&kernel3<Op::Min, T>, &kernel_acc<Op::Min, T>};
        case Op::Prod: return {&kernel3<Op::Prod, T>, &kernel_acc<Op::Prod, T>};
    }
    return {nullptr, nullptr};
}

Kernels kernels_for(DType dt, Op op) {
    switch (dt) {
        case DType::F16: return kernels_for<uint16_t>(op);
        case DType::F32: return kernels_for<float>(op);
        case DType::F64: return kernels_for<double>(op);
        case DType::I8: return kernels_for<int8_t>(op);
        case DType::U8: return kernels_for<uint8_t>(op);
        case DType::I32: return kernels_for<int32_t>(op);
        case DType::I64: return kernels_for<int64_t>(op);
    }
    return {nullptr, nullptr};
}

Op parse_op(const std::string& op) {
    if (op == "sum") return Op::Sum;
    if (op == "max") return Op::Max;
    if (op == "min") return Op::Min;
    if (op == "prod") return Op::Prod;
    throw py::value_error("all_reduce: unknown op '" + op + "'; expected one of: sum, max, min, prod");
}

DType parse_dtype(const char* what, const py::array& a);

// The operation a rank is in, as its peers see it: kind, dtype, and the op or root.
uint32_t op_code(Kind kind, DType dt, uint32_t arg) {
    return (static_cast<uint32_t>(kind) << 24) | (static_cast<uint32_t>(dt) << 16) | (arg & 0xffff);
}

std::string code_name(uint32_t code, uint64_t nbytes) {
    static const char* kinds[] = {"?", "all_reduce", "broadcast", "all_gather"};
    static const char* dtypes[] = {"float16", "float32", "float64", "int8", "uint8", "int32", "int64"};
    static const char* ops[] = {"sum", "max", "min", "prod"};
    const uint32_t kind = code >> 24, dt = (code >> 16) & 0xff, arg = code & 0xffff;
    std::string s = kind < 4 ? kinds[kind] : "?";
    if (kind == static_cast<uint32_t>(Kind::AllReduce)) s += std::string(" ") + (arg < 4 ? ops[arg] : "?");
    if (kind == static_cast<uint32_t>(Kind::Broadcast)) s += " from " + std::to_string(arg);
    return s + " of " + std::to_string(nbytes) + " bytes of " + (dt < 7 ? dtypes[dt] : "?");
}

struct Buf {
    py::array array;  // a reference while the GIL is released
    char* data;
    size_t nbytes, item;
    DType dtype;
};

Buf checked(const char* what, const py::object& obj, bool writable) {
    if (!py::isinstance<py::array>(obj))
        throw py::type_error(std::string(what) + ": expected a numpy.ndarray, got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (!(a.flags() & py::array::c_style) || (writable && !a.writeable()))
        throw py::value_error(std::string(what) + ": the array must be C-contiguous" + (writable ? " and writable" : ""));
    const DType dt = parse_dtype(what, a);
    char* data = static_cast<char*>(const_cast<void*>(a.data()));
    return {a, data, static_cast<size_t>(a.nbytes()), static_cast<size_t>(a.itemsize()), dt};
}

DType parse_dtype(const char* what, const py::array& a) {
    py::dtype dt = a.dtype();
    const char kind = dt.kind(), order = dt.byteorder();
    const auto size = dt.itemsize();
    if (order == '=' || order == '|') {
        if (kind == 'f' && size == 2) return DType::F16;
        if (kind == 'f' && size == 4) return DType::F32;
        if (kind == 'f' && size == 8) return DType::F64;
        if (kind == 'i' && size == 1) return DType::I8;
        if (kind == 'u' && size == 1) return DType::U8;
        if (kind == 'i' && size == 4) return DType::I32;
        if (kind == 'i' && size == 8) return DType::I64;
    }
    throw py::type_error(std::string(what) + ": dtype " + std::string(py::str(dt)) + " is not supported; use one of " + kDtypes);
}

// The input of an all_reduce: one array, or several read as their concatenation (data
// parallel's gradients, reduced where the engine left them into one bucket buffer).
struct Pieces {
    std::vector<const char*> data;
    std::vector<size_t> start;  // byte offset of each piece, then the total

    // bytes [off, off + len) of the concatenation into dst
    void copy(char* dst, size_t off, size_t len) const {
        size_t i = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), off) - start.begin()) - 1;
        while (len) {
            const size_t take = std::min(len, start[i + 1] - off);
            std::memcpy(dst, data[i] + (off - start[i]), take);
            dst += take, off += take, len -= take, ++i;
        }
    }
    // a pointer to bytes [off, off + len) when one piece holds them all, else nullptr
    const char* direct(size_t off, size_t len) const {
        size_t i = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), off) - start.begin()) - 1;
        return off + len <= start[i + 1] ? data[i] + (off - start[i]) : nullptr;
    }
};

template <typename T>
void scale_kernel(void* p, double by, size_t n) {
    T* x = static_cast<T*>(p);
    const T f = static_cast<T>(by);
    for (size_t i = 0; i < n; i++) x[i] *= f;
}

// ---------------------------------------------------------------- the segment

class Segment {
public:
    // rank 0 creates (O_EXCL: a name is never reused), the others attach; every rank then
    // writes its pid. Throws OSError (errno) or ValueError (a segment of another shape).
    Segment(const std::string& name, int rank, int world, size_t chunk_bytes, bool create)
        : name_(name), rank_(rank), world_(world), chunk_(chunk_bytes) {
        if (world < 1 || rank < 0 || rank >= world)
            throw py::value_error("shm segment: rank " + std::to_string(rank) + " is not in a world of " + std::to_string(world));
        if (chunk_bytes < 4096 || chunk_bytes % 4096)
            throw py::value_error("shm segment: chunk_bytes=" + std::to_string(chunk_bytes) + " must be a positive multiple of 4096");
        data_off_ = (sizeof(Header) + world * sizeof(Line) + 4095) / 4096 * 4096;
        total_ = data_off_ + 2 * world * chunk_;
        int fd = create ? shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600)
                        : shm_open(name.c_str(), O_RDWR, 0);
        if (fd < 0) throw_errno();
        if (create && ftruncate(fd, static_cast<off_t>(total_)) != 0) {
            int e = errno;
            ::close(fd);
            shm_unlink(name.c_str());
            errno = e;
            throw_errno();
        }
        struct stat st {};
        if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != total_) {
            ::close(fd);
            throw py::value_error("shm segment " + name + " holds " + std::to_string(st.st_size) + " bytes, expected " +
                                  std::to_string(total_) + " (a segment of another group or world size)");
        }
        void* p = mmap(nullptr, total_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        ::close(fd);
        if (p == MAP_FAILED) throw_errno();
        base_ = static_cast<char*>(p);
        auto* h = header();
        if (create) {
            h->world = static_cast<uint32_t>(world);
            h->chunk_bytes = chunk_;
            h->total_bytes = total_;
            std::atomic_thread_fence(std::memory_order_release);
            reinterpret_cast<std::atomic<uint64_t>*>(&h->magic)->store(kMagic, std::memory_order_release);
        } else if (reinterpret_cast<std::atomic<uint64_t>*>(&h->magic)->load(std::memory_order_acquire) != kMagic ||
                   h->world != static_cast<uint32_t>(world) || h->chunk_bytes != chunk_) {
            unmap();
            throw py::value_error("shm segment " + name + " was made for another world or chunk size");
        }
        line(rank_)->pid.store(static_cast<int32_t>(getpid()), std::memory_order_release);
    }

    ~Segment() { unmap(); }

    // Unmap now, or, while an operation runs on another thread, when it ends (it keeps the
    // memory until then: its own deadline bounds that). Idempotent.
    void close() {
        std::lock_guard<std::mutex> lk(state_);
        closing_ = true;
        if (!in_flight_) unmap();
    }

    // Reduce `array` (C-contiguous, writable) over the ranks in place. Blocks with the GIL
    // released until every rank has done the same call, or raises ShmTimeoutError after
    // timeout_ms, ShmPeerError when a peer's process is gone, ShmMismatchError when a peer
    // called it with another size, dtype or op.
    void all_reduce(py::object obj, const std::string& opname, int64_t timeout_ms) {
        const Buf a = checked("all_reduce", obj, true);
        Pieces in{{a.data}, {0, a.nbytes}};
        reduce_all("all_reduce", in, a, parse_op(opname), 1.0, timeout_ms);
    }

    // Reduce the concatenation of `inputs` (C-contiguous arrays of out's dtype, read only,
    // their bytes adding up to out's) over the ranks into `out`, times `scale` (1, or a float
    // dtype with op sum: an average). Blocks and raises like all_reduce.
    void all_reduce_gather(py::list inputs, py::object out_obj, const std::string& opname,
                           double scale, int64_t timeout_ms) {
        const Buf out = checked("all_reduce_gather out", out_obj, true);
        const Op op = parse_op(opname);
        if (scale != 1.0 && (op != Op::Sum || (out.dtype != DType::F32 && out.dtype != DType::F64)))
            throw py::value_error("all_reduce_gather: a scale other than 1 needs op sum and float32 or float64");
        Pieces in;
        std::vector<Buf> keep;  // the arrays stay referenced while the GIL is released
        size_t total = 0;
        for (const auto& item : inputs) {
            Buf b = checked("all_reduce_gather input", py::reinterpret_borrow<py::object>(item), false);
            if (b.dtype != out.dtype) throw py::type_error("all_reduce_gather: every input needs out's dtype");
            in.data.push_back(b.data);
            in.start.push_back(total);
            total += b.nbytes;
            keep.push_back(std::move(b));
        }
        in.start.push_back(total);
        if (total != out.nbytes)
            throw py::value_error("all_reduce_gather: the inputs hold " + std::to_string(total) + " bytes, out " +
                                  std::to_string(out.nbytes));
        reduce_all("all_reduce", in, out, op, scale, timeout_ms);
    }

    // Copy rank `root`'s `array` into every rank's, in place (the same shape and dtype on
    // every rank). Blocks and raises like all_reduce.
    void broadcast(py::object obj, int root, int64_t timeout_ms) {
        if (root < 0 || root >= world_) throw py::value_error("broadcast: root " + std::to_string(root) + " is not a rank of the group");
        const Buf a = checked("broadcast", obj, root != rank_);
        const uint32_t code = op_code(Kind::Broadcast, a.dtype, static_cast<uint32_t>(root));
        py::gil_scoped_release nogil;
        InFlight guard(this, "broadcast");  // released before the GIL is retaken
        const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
        describe(code, a.nbytes);
        size_t done = 0;
        do {
            const size_t bytes = std::min(chunk_, a.nbytes - done);
            const int set = static_cast<int>(chunks_++ & 1);
            if (rank_ == root) std::memcpy(slot(set, root), a.data + done, bytes);
            arrive();
            wait_all(deadline, "the root's data");
            if (done == 0) check_peers(code, a.nbytes, "broadcast");
            if (rank_ != root) std::memcpy(a.data + done, slot(set, root), bytes);
            done += bytes;
        } while (done < a.nbytes);
        ops_++;
    }

    // out (C-contiguous, world x inp's bytes) = every rank's `inp`, in rank order. Blocks and
    // raises like all_reduce.
    void all_gather(py::object inp_obj, py::object out_obj, int64_t timeout_ms) {
        const Buf in = checked("all_gather", inp_obj, false);
        const Buf out = checked("all_gather", out_obj, true);
        if (out.nbytes != in.nbytes * world_ || out.dtype != in.dtype)
            throw py::value_error("all_gather: out must hold world x inp (" + std::to_string(in.nbytes * world_) + " bytes of inp's dtype), got " +
                                  std::to_string(out.nbytes) + " bytes");
        const uint32_t code = op_code(Kind::AllGather, in.dtype, 0);
        py::gil_scoped_release nogil;
        InFlight guard(this, "all_gather");  // released before the GIL is retaken
        const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
        describe(code, in.nbytes);
        size_t done = 0;
        do {
            const size_t bytes = std::min(chunk_, in.nbytes - done);
            const int set = static_cast<int>(chunks_++ & 1);
            std::memcpy(slot(set, rank_), in.data + done, bytes);
            arrive();
            wait_all(deadline, "the ranks' data");
            if (done == 0) check_peers(code, in.nbytes, "all_gather");
            for (int r = 0; r < world_; r++) {
                const char* src = r == rank_ ? in.data + done : slot(set, r);
                std::memcpy(out.data + r * in.nbytes + done, src, bytes);
            }
            done += bytes;
        } while (done < in.nbytes);
        ops_++;
    }

    int pid(int rank) const {
        if (!base_ || rank < 0 || rank >= world_) throw py::index_error("pid: no rank " + std::to_string(rank));
        return line(rank)->pid.load(std::memory_order_acquire);
    }

    const std::string& name() const { return name_; }
    size_t chunk_bytes() const { return chunk_; }
    size_t total_bytes() const { return total_; }
    uint64_t ops() const { return ops_; }
    // (waits for a peer, those that outlasted the spin, those that went to sleep, seconds spent
    // past the spin): where an operation's time goes when peers arrive late.
    py::tuple wait_stats() const { return py::make_tuple(stats_.waits, stats_.yields, stats_.sleeps, stats_.seconds); }

    bool closed() {
        std::lock_guard<std::mutex> lk(state_);
        return closing_ || base_ == nullptr;
    }

private:
    Header* header() const { return reinterpret_cast<Header*>(base_); }
    Line* line(int r) const { return reinterpret_cast<Line*>(base_ + sizeof(Header)) + r; }
    char* slot(int set, int r) const { return base_ + data_off_ + (static_cast<size_t>(set) * world_ + r) * chunk_; }

    // all_reduce of the concatenation `in` into `out` (the same memory for an in-place one; see
    // the top of the file), times `scale`.
    void reduce_all(const char* what, const Pieces& in, const Buf& out, Op op, double scale, int64_t timeout_ms) {
        const size_t item = out.item, nbytes = out.nbytes;
        char* buf = out.data;
        const Kernels k = kernels_for(out.dtype, op);
        void (*scaler)(void*, double, size_t) = scale == 1.0 ? nullptr
            : out.dtype == DType::F32 ? &scale_kernel<float> : &scale_kernel<double>;
        const uint32_t code = op_code(Kind::AllReduce, out.dtype, static_cast<uint32_t>(op));
        py::gil_scoped_release nogil;
        InFlight guard(this, what);  // released before the GIL is retaken
        const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
        describe(code, nbytes);
        const size_t align = kLine / item;  // partition boundaries on cache lines
        size_t done = 0;
        bool first = true;
        do {
            const size_t bytes = std::min(chunk_, nbytes - done);
            const size_t n = bytes / item;
            const int set = static_cast<int>(chunks_++ & 1);
            const size_t units = (n + align - 1) / align;
            auto part = [&](int r) {  // [first, last) elements of rank r's partition
                return std::make_pair(std::min(n, units * r / world_ * align), std::min(n, units * (r + 1) / world_ * align));
            };
            char* chunk = buf + done;
            // only the partitions the peers reduce: this rank reads its own straight from `in`
            for (int r = 0; r < world_; r++) {
                auto [a, b] = part(r);
                if (r != rank_ && b > a) in.copy(slot(set, rank_) + a * item, done + a * item, (b - a) * item);
            }
            arrive();
            wait_all(deadline, "the chunk's data");
            if (first) {
                check_peers(code, nbytes, what);
                first = false;
            }
            auto [lo, hi] = part(rank_);
            reduce_partition(k, scaler, scale, set, in, done, chunk, lo * item, (hi - lo) * item, item);
            arrive();
            wait_all(deadline, "the reduced partitions");
            for (int r = 0; r < world_; r++) {
                auto [a, b] = part(r);
                if (r != rank_ && b > a) std::memcpy(chunk + a * item, slot(set, r) + a * item, (b - a) * item);
            }
            done += bytes;
        } while (done < nbytes);
        ops_++;
    }

    // Reduce bytes [off, off + len) of every rank's chunk (this rank's read from `in` at
    // `base` + off, the peers' from their slots of `set`) in rank order, like a sequential numpy
    // reduction (a0 op a1 op a2 ...), tile by tile through a buffer that stays in L1 (no loop
    // writes what it reads), times `scale` when `scaler` is set, into `chunk` (the output) and
    // into this rank's slot, where the peers copy it from.
    void reduce_partition(const Kernels& k, void (*scaler)(void*, double, size_t), double scale, int set,
                          const Pieces& in, size_t base, char* chunk, size_t off, size_t len, size_t item) {
        alignas(64) static thread_local char tile[kTile];
        alignas(64) static thread_local char own[kTile];
        for (size_t t = 0; t < len; t += kTile) {
            const size_t bytes = std::min(kTile, len - t), n = bytes / item;
            const char* mine = in.direct(base + off + t, bytes);
            if (!mine) {  // the tile spans two inputs: gather it (L1 traffic only)
                in.copy(own, base + off + t, bytes);
                mine = own;
            }
            auto src = [&](int r) -> const char* { return r == rank_ ? mine : slot(set, r) + off + t; };
            if (world_ > 1) {
                k.three(tile, src(0), src(1), n);
                for (int r = 2; r < world_; r++) k.acc(tile, src(r), n);
            } else {
                std::memcpy(tile, mine, bytes);
            }
            if (scaler) scaler(tile, scale, n);
            std::memcpy(slot(set, rank_) + off + t, tile, bytes);
            std::memcpy(chunk + off + t, tile, bytes);
        }
    }

    // Marks an operation running (close() then defers the unmap to its end); refuses to start
    // on a closed segment.
    struct InFlight {
        Segment* s;
        InFlight(Segment* seg, const char* what) : s(seg) {
            std::lock_guard<std::mutex> lk(s->state_);
            if (s->closing_ || !s->base_) throw std::invalid_argument(std::string(what) + ": the shm segment " + s->name_ + " is closed");
            s->in_flight_ = true;
        }
        ~InFlight() {
            std::lock_guard<std::mutex> lk(s->state_);
            s->in_flight_ = false;
            if (s->closing_) s->unmap();
        }
    };

    void describe(uint32_t code, uint64_t nbytes) {
        Line* me = line(rank_);
        me->op_code[ops_ & 1] = code;
        me->op_bytes[ops_ & 1] = nbytes;  // published by the release store of the next arrival
    }

    void check_peers(uint32_t code, uint64_t nbytes, const char* op) {
        for (int r = 0; r < world_; r++) {
            const Line* l = line(r);
            const uint32_t theirs = l->op_code[ops_ & 1];
            const uint64_t their_bytes = l->op_bytes[ops_ & 1];
            if (theirs != code || their_bytes != nbytes) {
                throw ShmMismatch(std::string(op) + " on rank " + std::to_string(rank_) + " of the shm group (" + code_name(code, nbytes) +
                                  ") met rank " + std::to_string(r) + " in another call (" + code_name(theirs, their_bytes) +
                                  "): every rank must make the same call with the same size, dtype and op");
            }
        }
    }

    void arrive() {
        Line* me = line(rank_);
        me->seq.store(++epoch_, std::memory_order_seq_cst);
        if (me->waiters.load(std::memory_order_seq_cst) != 0) futex(&me->seq, FUTEX_WAKE, INT_MAX, nullptr);
    }

    void wait_all(Clock::time_point deadline, const char* what) {
        for (int r = 0; r < world_; r++)
            if (r != rank_) wait_for(r, deadline, what);
    }

    void wait_for(int r, Clock::time_point deadline, const char* what) {
        Line* l = line(r);
        const uint32_t target = epoch_;
        stats_.waits++;
        for (int i = 0; i < spins_; i++) {
            if (reached(l->seq.load(std::memory_order_acquire), target)) {
                spins_ = std::min(kSpinsMax, spins_ * 2);
                return;
            }
            SHOAL_PAUSE();
        }
        spins_ = std::max(kSpinsMin, spins_ / 4);
        const auto t0 = Clock::now();
        struct Timed {  // the time past the spin, on every way out
            WaitStats& st; Clock::time_point t0;
            ~Timed() { st.seconds += std::chrono::duration<double>(Clock::now() - t0).count(); }
        } timed{stats_, t0};
        stats_.yields++;
        const auto yield_until = t0 + std::chrono::microseconds(kYieldUs);
        for (int i = 0;; i++) {
            if (reached(l->seq.load(std::memory_order_acquire), target)) return;
            sched_yield();
            if ((i & 15) == 15 && Clock::now() > yield_until) break;
        }
        stats_.sleeps++;
        const timespec ts{0, kSleepNs};
        while (true) {
            l->waiters.fetch_add(1, std::memory_order_seq_cst);
            uint32_t v = l->seq.load(std::memory_order_seq_cst);
            if (!reached(v, target)) futex(&l->seq, FUTEX_WAIT, v, &ts);
            l->waiters.fetch_sub(1, std::memory_order_seq_cst);
            if (reached(l->seq.load(std::memory_order_acquire), target)) return;
            if (!alive(l->pid.load(std::memory_order_acquire))) {
                throw ShmPeerFailed("rank " + std::to_string(r) + " of the shm group (pid " + std::to_string(l->pid.load()) +
                                    ") exited while rank " + std::to_string(rank_) + " waited for " + what);
            }
            if (Clock::now() > deadline) {
                throw ShmTimeout("rank " + std::to_string(rank_) + " waited for rank " + std::to_string(r) + " of the shm group (" +
                                 what + ") past the deadline");
            }
        }
    }

    // OSError(errno, strerror, name) with the GIL held (the constructor runs under it)
    [[noreturn]] void throw_errno() {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, name_.c_str());
        throw py::error_already_set();
    }

    void unmap() {
        if (base_) {
            munmap(base_, total_);
            base_ = nullptr;
        }
    }

    struct WaitStats {
        uint64_t waits = 0, yields = 0, sleeps = 0;  // waits, and those past the spin, the yields
        double seconds = 0;                          // time in waits past the spin
    } stats_;
    int spins_ = kSpinsMin;  // the current spin length (one issuing thread uses a segment)
    std::string name_;
    int rank_, world_;
    size_t chunk_, data_off_ = 0, total_ = 0;
    char* base_ = nullptr;
    std::mutex state_;         // guards closing_ and in_flight_ (never held during an operation)
    bool closing_ = false, in_flight_ = false;
    uint32_t epoch_ = 0;   // arrivals so far; every rank counts the same sequence
    uint64_t chunks_ = 0;  // chunks so far: which set of slots is next
    uint64_t ops_ = 0;
};

}  // namespace

PYBIND11_MODULE(_shm, m) {
    m.doc() = R"doc(Collectives through one POSIX shared-memory segment, for ranks on one host.

Segment(name, rank, world, chunk_bytes, create) creates (rank 0, create=True, O_EXCL) or
attaches to the segment `name` (a /dev/shm name, starting with '/'). Segment.all_reduce(array,
op, timeout_ms) reduces a C-contiguous writable numpy array (float16/32/64, int8, uint8, int32,
int64; op sum, max, min or prod) in place over the ranks, with the GIL released, chunk by chunk;
all_reduce_gather(inputs, out, op, scale, timeout_ms) reduces the concatenation of a list of
arrays into `out` (times `scale`: data parallel's average, with no copy into a bucket first);
broadcast(array, root, timeout_ms) and all_gather(inp, out, timeout_ms) likewise.
One operation at a time per segment (the caller's issuing thread); after a ShmError the segment
is out of step and must not be used again. unlink_segment(name) removes the name (the memory
lives on while mapped).)doc";
    // translators run newest first: the subclasses are registered after their base
    auto& base = py::register_exception<ShmError>(m, "ShmError", PyExc_RuntimeError);
    py::register_exception<ShmTimeout>(m, "ShmTimeoutError", base.ptr());
    py::register_exception<ShmPeerFailed>(m, "ShmPeerError", base.ptr());
    py::register_exception<ShmMismatch>(m, "ShmMismatchError", base.ptr());

    py::class_<Segment>(m, "Segment")
        .def(py::init<const std::string&, int, int, size_t, bool>(), py::arg("name"), py::arg("rank"),
             py::arg("world"), py::arg("chunk_bytes"), py::arg("create"))
        .def("all_reduce", &Segment::all_reduce, py::arg("array"), py::arg("op") = "sum",
             py::arg("timeout_ms") = 30000)
        .def("all_reduce_gather", &Segment::all_reduce_gather, py::arg("inputs"), py::arg("out"),
             py::arg("op") = "sum", py::arg("scale") = 1.0, py::arg("timeout_ms") = 30000)
        .def("broadcast", &Segment::broadcast, py::arg("array"), py::arg("root"), py::arg("timeout_ms") = 30000)
        .def("all_gather", &Segment::all_gather, py::arg("inp"), py::arg("out"), py::arg("timeout_ms") = 30000)
        .def("pid", &Segment::pid, py::arg("rank"))
        .def("wait_stats", &Segment::wait_stats)
        .def("close", &Segment::close)
        .def_property_readonly("name", &Segment::name)
        .def_property_readonly("chunk_bytes", &Segment::chunk_bytes)
        .def_property_readonly("total_bytes", &Segment::total_bytes)
        .def_property_readonly("ops", &Segment::ops)
        .def_property_readonly("closed", &Segment::closed);

    m.def("unlink_segment", [](const std::string& name) {
        if (shm_unlink(name.c_str()) != 0 && errno != ENOENT) {
            PyErr_SetFromErrnoWithFilename(PyExc_OSError, name.c_str());
            throw py::error_already_set();
        }
    }, py::arg("name"), "Remove the segment's name (ENOENT is not an error); mappings stay valid.");
}

// shoal.ps._keymap: the parameter server's uint64 key -> int64 row hash map.
//
// Open addressing with linear probing over a power-of-two array of
// (key, row + 1) slots; a slot is empty when it holds row + 1 == 0 (so zeroed
// memory is an empty table, and every uint64 value is a valid key). Slots are placed by a splitmix64 finalizer of the key
// (feature ids are often sequential or share low bits, which an identity hash
// would pile into one cluster). Deletion shifts later members of the cluster
// back (no tombstones), so probe lengths never degrade with churn.
//
// The map allocates row ids itself: a new key takes the most recently freed
// row (a LIFO free list fed by erase), else the next fresh id. Invariant: every
// row id below row_bound is either held by exactly one key or on the free list
// exactly once; in_use_ records which.
//
// Not thread-safe: the caller serialises all calls (the sparse table holds a
// lock). The vectorised loops run with the GIL released.

#include "dedup.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;
using shoal::dedup;
using shoal::mix;

namespace {

constexpr int64_t kAbsent = -1;  // the row reported for a key that is not in the map
constexpr size_t kMinCapacity = 16;
// Grow when the load factor would pass 7/10: at 0.5-0.7 linear probing with a
// good mixer still finds most keys in the first cache line.
constexpr size_t kLoadNum = 7;
constexpr size_t kLoadDen = 10;
// How many keys ahead the batch loops prefetch their home slot; enough misses
// in flight to hide DRAM latency on a table much larger than the caches.
constexpr size_t kPrefetch = 16;
// insert_with_rows puts every unheld id below the new row_bound on the free
// list, so a row id is bounded by what fits in memory; this catches garbage
// ids (2**40 rows is far beyond any one server) before allocating for them.
constexpr int64_t kMaxRow = int64_t{1} << 40;

struct Slot {
    uint64_t key;
    int64_t row1;  // row + 1; 0 marks a free slot
    bool empty() const { return row1 == 0; }
    int64_t row() const { return row1 - 1; }
};

// A zero-filled slot array. Large tables are mapped 2 MiB-aligned and marked
// for transparent huge pages: random probes into a table of hundreds of MiB
// otherwise miss the TLB on nearly every key, and a rehash would take one
// page fault per 4 KiB of the new table.
class SlotArray {
public:
    SlotArray() = default;
    explicit SlotArray(size_t n) : n_(n) {
        size_t bytes = n * sizeof(Slot);
        if (bytes < kHuge) {
            p_ = static_cast<Slot*>(std::calloc(n, sizeof(Slot)));
            if (!p_) throw std::bad_alloc();
            return;
        }
        map_len_ = (bytes + kHuge - 1) / kHuge * kHuge + kHuge;
        void* raw = mmap(nullptr, map_len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (raw == MAP_FAILED) throw std::bad_alloc();
        map_base_ = static_cast<char*>(raw);
        char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + kHuge - 1) & ~(kHuge - 1));
#ifdef MADV_HUGEPAGE
        madvise(aligned, (bytes + kHuge - 1) / kHuge * kHuge, MADV_HUGEPAGE);  // a hint; failure is harmless
#endif
        p_ = reinterpret_cast<Slot*>(aligned);
    }
    SlotArray(const SlotArray&) = delete;
    SlotArray& operator=(const SlotArray&) = delete;
    SlotArray(SlotArray&& o) noexcept { swap(o); }
    SlotArray& operator=(SlotArray&& o) noexcept {
        SlotArray tmp(std::move(o));
        swap(tmp);
        return *this;
    }
    ~SlotArray() {
        if (map_base_) munmap(map_base_, map_len_);
        else std::free(p_);
    }
    void swap(SlotArray& o) noexcept {
        std::swap(p_, o.p_);
        std::swap(n_, o.n_);
        std::swap(map_base_, o.map_base_);
        std::swap(map_len_, o.map_len_);
    }
    Slot& operator[](size_t i) { return p_[i]; }
    const Slot& operator[](size_t i) const { return p_[i]; }
    size_t size() const { return n_; }
    Slot* begin() { return p_; }
    Slot* end() { return p_ + n_; }
    const Slot* begin() const { return p_; }
    const Slot* end() const { return p_ + n_; }
    void zero() { std::memset(static_cast<void*>(p_), 0, n_ * sizeof(Slot)); }

private:
    static constexpr size_t kHuge = size_t{2} << 20;
    Slot* p_ = nullptr;
    size_t n_ = 0;
    char* map_base_ = nullptr;
    size_t map_len_ = 0;
};

size_t round_up_pow2(size_t n) {
    size_t c = kMinCapacity;
    while (c < n) {
        if (c > (std::numeric_limits<size_t>::max() >> 1)) throw std::length_error("KeyMap capacity overflow");
        c <<= 1;
    }
    return c;
}

// Slots needed to hold n keys without passing the load limit.
size_t slots_for(size_t n) {
    if (n > std::numeric_limits<size_t>::max() / kLoadDen) throw std::length_error("KeyMap capacity overflow");
    return round_up_pow2((n * kLoadDen + kLoadNum - 1) / kLoadNum + 1);
}

// Geometric growth for vectors that are topped up per batch: reserving the
// exact need each call would reallocate on every call.
template <class T>
void reserve_for(std::vector<T>& v, size_t need) {
    if (v.capacity() < need) v.reserve(std::max(need, v.capacity() * 2));
}

class KeyMap {
public:
    explicit KeyMap(size_t capacity) { reset_slots(round_up_pow2(capacity)); }

    size_t size() const { return size_; }
    size_t capacity() const { return slots_.size(); }
    int64_t row_bound() const { return next_row_; }
    size_t free_rows() const { return free_.size(); }

    int64_t find(uint64_t key, uint64_t h) const {
        size_t i = h & mask_;
        for (;;) {
            const Slot& s = slots_[i];
            if (s.empty()) return kAbsent;
            if (s.key == key) return s.row();
            i = (i + 1) & mask_;
        }
    }

    void prefetch(uint64_t h) const { __builtin_prefetch(&slots_[h & mask_]); }

    // rows[i] = row of keys[i] or -1.
    void lookup(const uint64_t* keys, int64_t* rows, size_t n) const {
        uint64_t ring[kPrefetch];
        size_t ahead = std::min(n, kPrefetch);
        for (size_t j = 0; j < ahead; ++j) {
            ring[j] = mix(keys[j]);
            prefetch(ring[j]);
        }
        for (size_t i = 0; i < n; ++i) {
            uint64_t h = ring[i % kPrefetch];
            if (i + kPrefetch < n) {
                uint64_t hn = mix(keys[i + kPrefetch]);
                ring[i % kPrefetch] = hn;
                prefetch(hn);
            }
            rows[i] = find(keys[i], h);
        }
    }

    // Returns how many keys were inserted. Every occurrence of a key gets the
    // same answer: a key is inserted when any of its occurrences is admitted,
    // and is_new marks its first occurrence in the batch.
    size_t get_or_insert(const uint64_t* keys, const bool* admit, int64_t* rows, bool* is_new, size_t n) {
        std::vector<size_t> pending;  // absent and not admitted at their turn
        size_t inserted = 0;
        uint64_t ring[kPrefetch];
        size_t ahead = std::min(n, kPrefetch);
        for (size_t j = 0; j < ahead; ++j) {
            ring[j] = mix(keys[j]);
            prefetch(ring[j]);
        }
        for (size_t i = 0; i < n; ++i) {
            uint64_t h = ring[i % kPrefetch];
            if (i + kPrefetch < n) {
                uint64_t hn = mix(keys[i + kPrefetch]);
                ring[i % kPrefetch] = hn;
                prefetch(hn);
            }
            is_new[i] = false;
            uint64_t key = keys[i];
            size_t s = h & mask_;
            for (;;) {
                if (slots_[s].empty()) break;
                if (slots_[s].key == key) break;
                s = (s + 1) & mask_;
            }
            if (!slots_[s].empty()) {
                rows[i] = slots_[s].row();
                continue;
            }
            if (admit != nullptr && !admit[i]) {
                rows[i] = kAbsent;
                pending.push_back(i);
                continue;
            }
            if (size_ + 1 > grow_at_) {
                rehash(slots_.size() * 2);
                s = h & mask_;
                while (!slots_[s].empty()) s = (s + 1) & mask_;
            }
            int64_t r = alloc_row();
            slots_[s].key = key;
            slots_[s].row1 = r + 1;
            ++size_;
            ++inserted;
            rows[i] = r;
            is_new[i] = true;
        }
        if (inserted == 0 || pending.empty()) return inserted;

        // A non-admitted occurrence before an admitted one of the same key:
        // give it the row, and move is_new to it (the first occurrence).
        std::unordered_map<int64_t, size_t> first_new;
        for (size_t i = 0; i < n; ++i)
            if (is_new[i]) first_new.emplace(rows[i], i);
        for (size_t i : pending) {
            int64_t r = find(keys[i], mix(keys[i]));
            if (r == kAbsent) continue;
            rows[i] = r;
            auto it = first_new.find(r);
            if (it != first_new.end() && it->second > i) {
                is_new[it->second] = false;
                is_new[i] = true;
                it->second = i;
            }
        }
        return inserted;
    }

    // rows[i] = row freed for keys[i], or -1 when absent.
    // Prefetches like lookup: a spill or a promotion erases thousands of keys scattered over a
    // table larger than the caches, and without it each waited for its own miss (~3x slower).
    void erase(const uint64_t* keys, int64_t* rows, size_t n) {
        reserve_for(free_, free_.size() + n);
        uint64_t ring[kPrefetch];
        size_t ahead = std::min(n, kPrefetch);
        for (size_t j = 0; j < ahead; ++j) {
            ring[j] = mix(keys[j]);
            prefetch(ring[j]);
        }
        for (size_t i = 0; i < n; ++i) {
            uint64_t h = ring[i % kPrefetch];
            if (i + kPrefetch < n) {
                uint64_t hn = mix(keys[i + kPrefetch]);
                ring[i % kPrefetch] = hn;
                prefetch(hn);
            }
            uint64_t key = keys[i];
            size_t s = h & mask_;
            for (;;) {
                if (slots_[s].empty()) break;
                if (slots_[s].key == key) break;
                s = (s + 1) & mask_;
            }
            int64_t r = slots_[s].row();
            rows[i] = r;
            if (r == kAbsent) continue;
            remove_slot(s);
            in_use_[r] = 0;
            free_.push_back(r);
        }
    }

    // Validates everything first, allocates second, mutates last: a failed
    // call (error or MemoryError) leaves the map unchanged.
    void insert_with_rows(const uint64_t* keys, const int64_t* rows, size_t n) {
        if (n == 0) return;
        int64_t max_row = -1;
        for (size_t i = 0; i < n; ++i) {
            int64_t r = rows[i];
            if (r < 0 || r >= kMaxRow)
                throw py::value_error(msg("insert_with_rows: row ids must be in [0, 2**40), got ", r, " at index ", i));
            if (r < next_row_ && in_use_[r])
                throw py::value_error(msg("insert_with_rows: row ", r, " (index ", i,
                                          ") is already held by a key; erase that key first or choose a free row"));
            max_row = std::max(max_row, r);
            if (find(keys[i], mix(keys[i])) != kAbsent)
                throw py::value_error(msg("insert_with_rows: key ", keys[i], " (index ", i,
                                          ") is already in the map; erase it first to move it to another row"));
        }
        {
            std::vector<int64_t> sorted(rows, rows + n);
            std::sort(sorted.begin(), sorted.end());
            auto d = std::adjacent_find(sorted.begin(), sorted.end());
            if (d != sorted.end())
                throw py::value_error(msg("insert_with_rows: row ", *d, " appears more than once; rows must be unique"));
        }
        {
            std::vector<uint64_t> sorted(keys, keys + n);
            std::sort(sorted.begin(), sorted.end());
            auto d = std::adjacent_find(sorted.begin(), sorted.end());
            if (d != sorted.end())
                throw py::value_error(msg("insert_with_rows: key ", *d, " appears more than once; keys must be unique"));
        }

        int64_t new_bound = std::max(next_row_, max_row + 1);
        if (size_ + n > grow_at_) rehash(slots_for(size_ + n));
        // New free list: the old one minus the rows claimed now, then the
        // unclaimed ids of the extension, pushed high to low so that later
        // inserts take them in ascending order.
        std::vector<uint8_t> claimed(static_cast<size_t>(new_bound), 0);
        for (size_t i = 0; i < n; ++i) claimed[rows[i]] = 1;
        std::vector<int64_t> new_free;
        new_free.reserve(free_.capacity() + static_cast<size_t>(new_bound - next_row_));
        for (int64_t r : free_)
            if (!claimed[r]) new_free.push_back(r);
        for (int64_t r = new_bound - 1; r >= next_row_; --r)
            if (!claimed[r]) new_free.push_back(r);
        in_use_.resize(static_cast<size_t>(new_bound), 0);

        for (size_t i = 0; i < n; ++i) {
            size_t s = mix(keys[i]) & mask_;
            while (!slots_[s].empty()) s = (s + 1) & mask_;
            slots_[s].key = keys[i];
            slots_[s].row1 = rows[i] + 1;
            in_use_[rows[i]] = 1;
        }
        size_ += n;
        free_.swap(new_free);
        next_row_ = new_bound;
    }

    // Writes all (key, row) pairs in slot order; out arrays hold size() entries.
    void items(uint64_t* keys, int64_t* rows) const {
        size_t k = 0;
        for (const Slot& s : slots_) {
            if (s.empty()) continue;
            if (keys) keys[k] = s.key;
            if (rows) rows[k] = s.row();
            ++k;
        }
    }

    const std::vector<uint8_t>& in_use() const { return in_use_; }

    void clear() {
        slots_.zero();
        size_ = 0;
        next_row_ = 0;
        free_.clear();
        in_use_.clear();
    }

    void reserve(size_t n) {
        if (n > grow_at_) rehash(slots_for(n));
    }

private:
    template <class... A>
    static std::string msg(const A&... parts) {
        std::ostringstream os;
        (os << ... << parts);
        return os.str();
    }

    void reset_slots(size_t cap) {
        slots_ = SlotArray(cap);
        mask_ = cap - 1;
        grow_at_ = cap / kLoadDen * kLoadNum + (cap % kLoadDen) * kLoadNum / kLoadDen;
    }

    void rehash(size_t new_cap) {
        SlotArray old(new_cap);
        old.swap(slots_);
        mask_ = new_cap - 1;
        grow_at_ = new_cap / kLoadDen * kLoadNum + (new_cap % kLoadDen) * kLoadNum / kLoadDen;
        // Old slots in order land in two nearly sequential runs of the new
        // table (home slot i or i + old capacity), so this stays cache-friendly.
        for (const Slot& o : old) {
            if (o.empty()) continue;
            size_t s = mix(o.key) & mask_;
            while (!slots_[s].empty()) s = (s + 1) & mask_;
            slots_[s] = o;
        }
    }

    int64_t alloc_row() {
        if (!free_.empty()) {
            int64_t r = free_.back();
            free_.pop_back();
            in_use_[r] = 1;
            return r;
        }
        reserve_for(in_use_, in_use_.size() + 1);
        in_use_.push_back(1);
        return next_row_++;
    }

    // Backward-shift deletion: pull later members of the cluster into the
    // hole whenever the hole lies on their probe path (between their home slot
    // and where they sit, cyclically).
    void remove_slot(size_t hole) {
        size_t j = hole;
        for (;;) {
            j = (j + 1) & mask_;
            if (slots_[j].empty()) break;
            size_t home = mix(slots_[j].key) & mask_;
            if (((j - home) & mask_) >= ((j - hole) & mask_)) {
                slots_[hole] = slots_[j];
                hole = j;
            }
        }
        slots_[hole].row1 = 0;
        --size_;
    }

    SlotArray slots_;
    size_t mask_ = 0;
    size_t grow_at_ = 0;
    size_t size_ = 0;
    int64_t next_row_ = 0;
    std::vector<int64_t> free_;
    std::vector<uint8_t> in_use_;
};

// ---- Python boundary: dtype and shape checks, then raw pointers. ----

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

template <class T>
using CArray = py::array_t<T, py::array::c_style>;

template <class T>
CArray<T> as_vector(const py::handle& obj, const char* what, const char* dtype, const char* hint) {
    if (!py::isinstance<py::array>(obj)) {
        throw py::type_error(std::string(what) + " must be a 1-D numpy array of dtype " + dtype + ", got " +
                             py::str(py::type::of(obj).attr("__name__")).cast<std::string>() + "; " + hint);
    }
    py::array a = py::reinterpret_borrow<py::array>(obj);
    if (!a.dtype().is(py::dtype::of<T>()) && !a.dtype().equal(py::dtype::of<T>())) {
        throw py::type_error(std::string(what) + " must have dtype " + dtype + ", got " + dtype_name(a) + "; " + hint);
    }
    if (a.ndim() != 1) {
        throw py::value_error(std::string(what) + " must be 1-D, got shape with ndim=" + std::to_string(a.ndim()) +
                              "; flatten it with .ravel()");
    }
    // Same dtype, only the layout may differ: a strided view is copied, never cast.
    auto out = CArray<T>::ensure(a);
    if (!out) throw py::value_error(std::string(what) + ": could not make a contiguous copy of the array");
    return out;
}

constexpr const char* kKeysHint = "convert with np.asarray(keys, dtype=np.uint64) (check the values first: "
                                  "a cast wraps negative ints and truncates floats)";

CArray<uint64_t> keys_arg(const py::handle& obj) { return as_vector<uint64_t>(obj, "keys", "uint64", kKeysHint); }


py::array_t<uint64_t> to_array(const std::vector<uint64_t>& v) {
    py::array_t<uint64_t> out(static_cast<py::ssize_t>(v.size()));
    if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(uint64_t));
    return out;
}

}  // namespace

PYBIND11_MODULE(_keymap, m) {
    m.doc() = "Native uint64 key -> int64 row hash map of the parameter server's sparse tables.";

    py::class_<KeyMap>(m, "KeyMap", R"doc(
Open-addressing hash map from uint64 feature ids to int64 row ids.

Every uint64 value is a valid key (0 and 2**64-1 included). The map hands
out row ids itself: a new key takes the most recently freed row (erase feeds
a LIFO free list), else the next fresh id 0, 1, 2, ...; ``row_bound`` is the
length the caller's row arrays need. Linear probing on a power-of-two table,
a splitmix64 slot hash, backward-shift deletion; the table doubles (a full
rehash) when the load factor passes 0.7.

Batch methods take 1-D numpy arrays of dtype uint64 (anything else raises
TypeError or ValueError: nothing is silently cast) and return freshly
allocated numpy arrays that never alias the table, so a later rehash does not
affect them. They release the GIL while they run.

Not thread-safe: the caller must serialise all calls on one map, reads
included (the sparse table holds a lock around it).

Example:
    >>> m = KeyMap()
    >>> rows, new = m.get_or_insert(np.array([7, 9, 7], dtype=np.uint64))
    >>> rows.tolist(), new.tolist()
    ([0, 1, 0], [True, True, False])
)doc")
        .def(py::init([](int64_t capacity) {
                 if (capacity < 0)
                     throw py::value_error("KeyMap(capacity=" + std::to_string(capacity) +
                                           "): capacity must be >= 0 (slots)");
                 return new KeyMap(static_cast<size_t>(capacity));
             }),
             py::arg("capacity") = 1024, R"doc(
Create an empty map with at least ``capacity`` slots.

Args:
    capacity: initial number of slots, rounded up to a power of two
        (minimum 16). The map holds up to 0.7 * capacity keys before it
        rehashes; use ``reserve(n)`` to size it for n keys instead.

Raises:
    ValueError: capacity is negative.
)doc")
        .def(
            "lookup",
            [](const KeyMap& self, const py::object& keys_obj) {
                auto keys = keys_arg(keys_obj);
                size_t n = static_cast<size_t>(keys.shape(0));
                py::array_t<int64_t> rows(static_cast<py::ssize_t>(n));
                const uint64_t* k = keys.data();
                int64_t* r = rows.mutable_data();
                {
                    py::gil_scoped_release nogil;
                    self.lookup(k, r, n);
                }
                return rows;
            },
            py::arg("keys"), R"doc(
Rows of ``keys``; -1 where a key is absent. Read-only: creates nothing.

Args:
    keys: 1-D uint64 array (duplicates allowed).

Returns:
    int64 array of len(keys).

Raises:
    TypeError: keys is not a numpy array of dtype uint64.
    ValueError: keys is not 1-D.

Not thread-safe (see the class); releases the GIL.
)doc")
        .def(
            "get_or_insert",
            [](KeyMap& self, const py::object& keys_obj, const py::object& admit_obj) {
                auto keys = keys_arg(keys_obj);
                size_t n = static_cast<size_t>(keys.shape(0));
                CArray<bool> admit;
                const bool* a = nullptr;
                if (!admit_obj.is_none()) {
                    admit = as_vector<bool>(admit_obj, "admit", "bool",
                                            "pass a boolean mask such as (counts >= threshold)");
                    if (static_cast<size_t>(admit.shape(0)) != n)
                        throw py::value_error("admit has length " + std::to_string(admit.shape(0)) +
                                              " but keys has length " + std::to_string(n) +
                                              "; pass one admit flag per key");
                    a = admit.data();
                }
                py::array_t<int64_t> rows(static_cast<py::ssize_t>(n));
                py::array_t<bool> is_new(static_cast<py::ssize_t>(n));
                const uint64_t* k = keys.data();
                int64_t* r = rows.mutable_data();
                bool* nw = is_new.mutable_data();
                {
                    py::gil_scoped_release nogil;
                    self.get_or_insert(k, a, r, nw, n);
                }
                return py::make_tuple(rows, is_new);
            },
            py::arg("keys"), py::arg("admit") = py::none(), R"doc(
Rows of ``keys``, creating rows for absent keys that are admitted.

An absent key is inserted (takes a new row: the most recently freed one, else
row_bound) when any of its occurrences in the batch has ``admit`` True; all
occurrences of a key get the same row. A key that stays absent reads -1 and
takes no row.

Args:
    keys: 1-D uint64 array (duplicates allowed).
    admit: None (admit all) or a 1-D bool array of len(keys).

Returns:
    (rows, is_new): rows int64 of len(keys), -1 for absent keys not
    admitted; is_new bool, True exactly at the first occurrence of each key
    this call inserted.

Raises:
    TypeError: keys not uint64, or admit not bool.
    ValueError: an array is not 1-D, or len(admit) != len(keys).
    MemoryError: the table could not grow; keys handled before the failure
        stay inserted.

Not thread-safe (see the class); releases the GIL.
)doc")
        .def(
            "erase",
            [](KeyMap& self, const py::object& keys_obj) {
                auto keys = keys_arg(keys_obj);
                size_t n = static_cast<size_t>(keys.shape(0));
                py::array_t<int64_t> rows(static_cast<py::ssize_t>(n));
                const uint64_t* k = keys.data();
                int64_t* r = rows.mutable_data();
                {
                    py::gil_scoped_release nogil;
                    self.erase(k, r, n);
                }
                return rows;
            },
            py::arg("keys"), R"doc(
Remove ``keys``; return the rows they held (-1 for absent keys).

Freed rows go on the free list and are handed out again by later inserts,
most recently freed first. A key repeated in the batch is freed once; its
later occurrences read -1. The caller should reset the freed rows' values.

Raises:
    TypeError: keys is not a numpy array of dtype uint64.
    ValueError: keys is not 1-D.

Not thread-safe (see the class); releases the GIL.
)doc")
        .def(
            "insert_with_rows",
            [](KeyMap& self, const py::object& keys_obj, const py::object& rows_obj) {
                auto keys = keys_arg(keys_obj);
                auto rows = as_vector<int64_t>(rows_obj, "rows", "int64", "convert with np.asarray(rows, dtype=np.int64)");
                if (keys.shape(0) != rows.shape(0))
                    throw py::value_error("insert_with_rows: keys has length " + std::to_string(keys.shape(0)) +
                                          " but rows has length " + std::to_string(rows.shape(0)) +
                                          "; pass one row per key");
                const uint64_t* k = keys.data();
                const int64_t* r = rows.data();
                size_t n = static_cast<size_t>(keys.shape(0));
                py::gil_scoped_release nogil;
                self.insert_with_rows(k, r, n);
            },
            py::arg("keys"), py::arg("rows"), R"doc(
Put ``keys`` at exactly the given ``rows`` (loading a checkpoint).

All-or-nothing: the arguments are checked first and on any error the map is
unchanged. Afterwards row_bound is max(row_bound, max(rows) + 1) and every
row id below it that no key holds is on the free list (ids newly uncovered by
this call are handed out in ascending order, before the older free list).
Rebuilding a saved map: ``m = KeyMap(); m.reserve(len(keys));
m.insert_with_rows(keys, rows)``; shards may be loaded by separate calls.

Args:
    keys: 1-D uint64 array of keys, unique, none of them in the map.
    rows: 1-D int64 array of len(keys): unique ids >= 0, none held by a key
        (ids on the free list are fine and leave it).

Raises:
    TypeError: keys not uint64 or rows not int64.
    ValueError: shapes differ or are not 1-D, a key is already present or
        repeated, a row is negative, repeated or in use.

Not thread-safe (see the class); releases the GIL.
)doc")
        .def(
            "keys",
            [](const KeyMap& self) {
                py::array_t<uint64_t> keys(static_cast<py::ssize_t>(self.size()));
                uint64_t* k = keys.mutable_data();
                {
                    py::gil_scoped_release nogil;
                    self.items(k, nullptr);
                }
                return keys;
            },
            R"doc(
All keys as a uint64 array, in table order (the same order as ``items()`` as
long as the map is not modified in between).

Not thread-safe (see the class); releases the GIL.
)doc")
        .def(
            "items",
            [](const KeyMap& self) {
                py::array_t<uint64_t> keys(static_cast<py::ssize_t>(self.size()));
                py::array_t<int64_t> rows(static_cast<py::ssize_t>(self.size()));
                uint64_t* k = keys.mutable_data();
                int64_t* r = rows.mutable_data();
                {
                    py::gil_scoped_release nogil;
                    self.items(k, r);
                }
                return py::make_tuple(keys, rows);
            },
            R"doc(
(keys uint64, rows int64) of every entry, in table order; rows[i] is the row
of keys[i]. Suitable for checkpoints and for ``insert_with_rows``.

Not thread-safe (see the class); releases the GIL.
)doc")
        .def(
            "in_use",
            [](const KeyMap& self) {
                const auto& used = self.in_use();
                py::array_t<bool> out(static_cast<py::ssize_t>(used.size()));
                if (!used.empty()) std::memcpy(out.mutable_data(), used.data(), used.size());
                return out;
            },
            R"doc(
bool [row_bound]: which row ids a key holds (the others are on the free list). A copy, in row
order; one memcpy, so far cheaper than ``items()`` when only the rows matter.

Not thread-safe (see the class).
)doc")
        .def("__len__", &KeyMap::size, "Number of keys in the map.")
        .def_property_readonly("size", &KeyMap::size, "Number of keys in the map (same as len()).")
        .def_property_readonly("capacity", &KeyMap::capacity,
                               "Number of slots (a power of two); the map rehashes to twice as many when "
                               "len() would pass 0.7 * capacity.")
        .def_property_readonly("row_bound", &KeyMap::row_bound,
                               "One past the highest row id ever handed out (or loaded): the length the "
                               "caller's row arrays need. Only clear() lowers it.")
        .def_property_readonly("free_rows", &KeyMap::free_rows,
                               "Number of row ids below row_bound that no key holds (the free list).")
        .def("clear", &KeyMap::clear, R"doc(
Remove every key and forget all rows: len, row_bound and free_rows become 0,
so the next inserts take rows 0, 1, 2, ... again. Keeps the allocated slots
(capacity is unchanged). Not thread-safe (see the class).
)doc")
        .def(
            "reserve",
            [](KeyMap& self, int64_t n) {
                if (n < 0) throw py::value_error("reserve(n=" + std::to_string(n) + "): n must be >= 0 (keys)");
                py::gil_scoped_release nogil;
                self.reserve(static_cast<size_t>(n));
            },
            py::arg("n"), R"doc(
Grow the table (one rehash) so that ``n`` keys in total fit without another
rehash. Never shrinks. Not thread-safe (see the class); releases the GIL.

Raises:
    ValueError: n is negative.
)doc")
        .def("__repr__", [](const KeyMap& self) {
            return "KeyMap(size=" + std::to_string(self.size()) + ", capacity=" + std::to_string(self.capacity()) +
                   ", row_bound=" + std::to_string(self.row_bound()) +
                   ", free_rows=" + std::to_string(self.free_rows()) + ")";
        });
    m.def(
        "unique_inverse",
        [](const py::object& keys_obj) {
            auto keys = keys_arg(keys_obj);
            return shoal::unique_inverse_arrays(keys.data(), static_cast<size_t>(keys.shape(0)));
        },
        py::arg("keys"), R"doc(
The distinct keys and, for each key, the index of its distinct key: one hashing pass, no sort.

Returns:
    (uniq uint64, inverse int64) with ``uniq[inverse] == keys``; ``uniq`` is in
    first-occurrence order (not sorted). Releases the GIL.
)doc");

    m.def(
        "segment_slots",
        [](const py::list& values, const py::object& which_obj, const py::object& slot_obj,
           const py::object& keys_obj, const py::object& at_obj, const py::object& out_obj,
           int64_t rows_per_segment) {
            // out is written in place: a float32 C-contiguous array or an error, never a converted copy
            if (!py::isinstance<py::array>(out_obj))
                throw py::type_error("segment_slots: out must be a 2-D float32 numpy array");
            py::array out = py::reinterpret_borrow<py::array>(out_obj);
            if (!out.dtype().equal(py::dtype::of<float>()) || !(out.flags() & py::array::c_style) ||
                !out.writeable())
                throw py::type_error("segment_slots: out must be a writeable C-contiguous float32 array, got " +
                                     dtype_name(out));
            auto which = as_vector<int64_t>(which_obj, "which", "int64", "pass segment indices as np.int64");
            auto slot = as_vector<int64_t>(slot_obj, "slot", "int64", "pass slots as np.int64");
            auto keys = keys_arg(keys_obj);
            auto at = as_vector<int64_t>(at_obj, "at", "int64", "pass output rows as np.int64");
            const size_t n = static_cast<size_t>(which.shape(0));
            if (static_cast<size_t>(slot.shape(0)) != n || static_cast<size_t>(keys.shape(0)) != n ||
                static_cast<size_t>(at.shape(0)) != n)
                throw py::value_error("segment_slots: which, slot, keys and at must have one entry each");
            if (out.ndim() != 2 || rows_per_segment <= 0)
                throw py::value_error("segment_slots: out must be 2-D [rows, width] and rows_per_segment > 0");
            const size_t width = static_cast<size_t>(out.shape(1));
            const size_t rps = static_cast<size_t>(rows_per_segment);
            const size_t seg_bytes = rps * (width + 2) * sizeof(float);
            // Python objects are read with the GIL held: the segment buffers first, then the copy.
            std::vector<const char*> base(values.size());
            for (size_t j = 0; j < base.size(); ++j) {
                PyObject* v = values[j].ptr();
                if (!PyBytes_Check(v) || static_cast<size_t>(PyBytes_GET_SIZE(v)) != seg_bytes) return 1;
                base[j] = PyBytes_AS_STRING(v);
            }
            const int64_t* w = which.data();
            const int64_t* sl = slot.data();
            const uint64_t* k = keys.data();
            const int64_t* a = at.data();
            float* o = static_cast<float*>(out.mutable_data());
            const size_t out_rows = static_cast<size_t>(out.shape(0));
            for (size_t i = 0; i < n; ++i) {
                if (w[i] < 0 || static_cast<size_t>(w[i]) >= base.size() || sl[i] < 0 ||
                    static_cast<size_t>(sl[i]) >= rps || a[i] < 0 || static_cast<size_t>(a[i]) >= out_rows)
                    throw py::value_error("segment_slots: an index is out of range at entry " + std::to_string(i));
            }
            {
                py::gil_scoped_release nogil;
                for (size_t i = 0; i < n; ++i) {
                    const char* seg = base[static_cast<size_t>(w[i])];
                    uint64_t stored;
                    std::memcpy(&stored, seg + rps * width * sizeof(float) + static_cast<size_t>(sl[i]) * 8, 8);
                    if (stored != k[i]) return 2;
                }
                for (size_t i = 0; i < n; ++i) {
                    const char* seg = base[static_cast<size_t>(w[i])];
                    std::memcpy(o + static_cast<size_t>(a[i]) * width,
                                seg + static_cast<size_t>(sl[i]) * width * sizeof(float), width * sizeof(float));
                }
            }
            return 0;
        },
        py::arg("values"), py::arg("which"), py::arg("slot"), py::arg("keys"), py::arg("at"), py::arg("out"),
        py::arg("rows_per_segment"), R"doc(
Copy records out of segments read from the cold tier (shoal.ps.tiers.ssd's layout: a segment
is rows_per_segment float32 records of out.shape[1] words, then their uint64 keys).

For each i: out[at[i]] = record slot[i] of segment values[which[i]], whose stored key must be
keys[i]. Returns 0 when done; 1 (nothing written) when a value is not bytes of a segment's
size (None: a missing segment); 2 (nothing written) when a stored key differs. Raises
ValueError for indices out of range. Releases the GIL while copying.
)doc");

    m.def(
        "merge_rows",
        [](const py::object& keys_obj, const py::object& rows_obj) {
            auto keys = keys_arg(keys_obj);
            const size_t n = static_cast<size_t>(keys.shape(0));
            if (!py::isinstance<py::array>(rows_obj))
                throw py::type_error("rows must be a 2-D float32 numpy array");
            py::array rows_any = py::reinterpret_borrow<py::array>(rows_obj);
            if (!rows_any.dtype().equal(py::dtype::of<float>()))
                throw py::type_error("rows must have dtype float32, got " + dtype_name(rows_any) +
                                     "; convert with rows.astype(np.float32)");
            if (rows_any.ndim() != 2 || static_cast<size_t>(rows_any.shape(0)) != n)
                throw py::value_error("rows must be 2-D with one row per key: " + std::to_string(n) +
                                      " keys, rows of ndim " + std::to_string(rows_any.ndim()));
            auto rows = CArray<float>::ensure(rows_any);
            const size_t d = static_cast<size_t>(rows.shape(1));
            std::vector<int64_t> inv(n);
            std::vector<uint64_t> uniq;
            const uint64_t* k = keys.data();
            const float* src = rows.data();
            {
                py::gil_scoped_release nogil;
                dedup(k, n, inv.data(), uniq);
            }
            py::array_t<float> out({static_cast<py::ssize_t>(uniq.size()), static_cast<py::ssize_t>(d)});
            float* dst = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                std::memset(dst, 0, uniq.size() * d * sizeof(float));
                for (size_t i = 0; i < n; ++i) {
                    float* o = dst + static_cast<size_t>(inv[i]) * d;
                    const float* r = src + i * d;
                    for (size_t j = 0; j < d; ++j) o[j] += r[j];
                }
            }
            return py::make_tuple(to_array(uniq), out);
        },
        py::arg("keys"), py::arg("rows"), R"doc(
Sum the rows of duplicate keys in one hashing pass (no sort).

Args:
    keys: 1-D uint64 [n]; rows: float32 [n, d].

Returns:
    (uniq uint64 [u], summed float32 [u, d]), keys in first-occurrence order.
    Rows of one key are added in input order. Releases the GIL.
)doc");
}

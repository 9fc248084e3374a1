// Hash-based dedup of uint64 keys, shared by the key map (shoal.ps._keymap) and the fused
// kernels (shoal.kernels._fused): header-only, so each extension compiles its own copy.
#pragma once

#include <pybind11/numpy.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace shoal {

// How many keys ahead the dedup loop prefetches its home slot.
constexpr size_t kDedupPrefetch = 16;

// The splitmix64 finalizer: every input bit affects every output bit.
inline uint64_t mix(uint64_t z) {
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9ULL;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return z;
}

// Dense ids 0..u-1 for the distinct keys of k[0..n), in first-occurrence order:
// inv[i] is the id of k[i] and uniq[id] its key. One hashing pass, no sort.
inline void dedup(const uint64_t* k, size_t n, int64_t* inv, std::vector<uint64_t>& uniq) {
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    const size_t mask = cap - 1;
    std::vector<uint64_t> slot_key(cap);
    std::vector<int64_t> slot_id(cap, -1);
    uniq.clear();
    uniq.reserve(n / 4 + 16);
    for (size_t i = 0; i < n; ++i) {
        if (i + kDedupPrefetch < n) __builtin_prefetch(&slot_id[mix(k[i + kDedupPrefetch]) & mask]);
        const uint64_t key = k[i];
        size_t s = mix(key) & mask;
        for (;;) {
            const int64_t id = slot_id[s];
            if (id < 0) {
                slot_id[s] = static_cast<int64_t>(uniq.size());
                slot_key[s] = key;
                inv[i] = static_cast<int64_t>(uniq.size());
                uniq.push_back(key);
                break;
            }
            if (slot_key[s] == key) {
                inv[i] = id;
                break;
            }
            s = (s + 1) & mask;
        }
    }
}

// (uniq, inverse) of k[0..n) as numpy arrays (both bindings' unique_inverse); the GIL is
// released while hashing, so the caller must hold it and keep `k` alive.
inline pybind11::tuple unique_inverse_arrays(const uint64_t* k, size_t n) {
    pybind11::array_t<int64_t> inv(static_cast<pybind11::ssize_t>(n));
    std::vector<uint64_t> uniq;
    int64_t* iv = inv.mutable_data();
    {
        pybind11::gil_scoped_release nogil;
        dedup(k, n, iv, uniq);
    }
    pybind11::array_t<uint64_t> out(static_cast<pybind11::ssize_t>(uniq.size()));
    if (!uniq.empty()) std::copy(uniq.begin(), uniq.end(), out.mutable_data());
    return pybind11::make_tuple(out, inv);
}

}  // namespace shoal

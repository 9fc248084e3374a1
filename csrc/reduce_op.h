// The elementwise reductions of the collectives (the Gloo binding's own reduce_scatter and
// custom reductions, the shared-memory all_reduce), with numpy's semantics: integers wrap on
// overflow, max/min propagate NaN.
#pragma once

#include <cstdint>
#include <type_traits>

namespace shoal_reduce {

enum class Op : uint32_t { Sum, Max, Min, Prod };

template <Op op, typename T>
inline T apply(T a, T b) {
    if constexpr (std::is_integral_v<T>) {
        using U = std::make_unsigned_t<T>;  // wrap around like numpy (signed overflow is UB)
        if constexpr (op == Op::Sum) return static_cast<T>(static_cast<U>(static_cast<U>(a) + static_cast<U>(b)));
        if constexpr (op == Op::Prod) return static_cast<T>(static_cast<U>(static_cast<U>(a) * static_cast<U>(b)));
        if constexpr (op == Op::Max) return a < b ? b : a;
        if constexpr (op == Op::Min) return b < a ? b : a;
    } else {
        if constexpr (op == Op::Sum) return a + b;
        if constexpr (op == Op::Prod) return a * b;
        // NaN propagates, as in np.maximum / np.minimum
        if constexpr (op == Op::Max) return (b > a || b != b) ? b : a;
        if constexpr (op == Op::Min) return (b < a || b != b) ? b : a;
    }
}

}  // namespace shoal_reduce

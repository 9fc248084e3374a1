"""Array kernels over a numpy or cupy backend, plus the fused kernels of the engine and the PS."""
from shoal.kernels._allocator import mapped_zeros, release_free_memory, tune_allocator, tune_for_server
from shoal.kernels._backend import Backend
from shoal.kernels._fused import ctr_pull, ctr_push
from shoal.kernels._errors import BackendError, KernelError, KernelShapeError
from shoal.kernels._registry import (available_backends, backend_of, default_backend,
                                     get_backend, register_backend, registered_backends,
                                     seed, set_default_backend)

__all__ = [
    "Backend", "BackendError", "KernelError", "KernelShapeError", "available_backends",
    "backend_of", "default_backend", "get_backend", "register_backend",
    "registered_backends", "seed", "set_default_backend", "tune_allocator", "release_free_memory",
    "tune_for_server", "mapped_zeros", "ctr_push", "ctr_pull",
]

ALLOCATOR_TUNED = tune_allocator()

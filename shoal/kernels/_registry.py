"""Backends by name: a registry, a default, and lookup by array type."""
from __future__ import annotations

from shoal.kernels._backend import Backend
from shoal.kernels._cupy import CupyBackend
from shoal.kernels._errors import BackendError
from shoal.kernels._numpy import NumpyBackend

_CLASSES: dict[str, type[Backend]] = {}
_INSTANCES: dict[str, Backend] = {}
_BY_TYPE: dict[type, Backend] = {}
_default = "numpy"


def register_backend(name: str, cls: type[Backend]) -> None:
    """Make `cls` available as `get_backend(name)`."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendError(f"register_backend({name!r}): {cls!r} is not a subclass of Backend")
    _CLASSES[name] = cls
    _INSTANCES.pop(name, None)


def registered_backends() -> list[str]:
    """Every registered name, usable here or not."""
    return sorted(_CLASSES)


def available_backends() -> list[str]:
    """The registered backends that can run on this machine."""
    return [n for n in registered_backends() if _CLASSES[n].available()]


def get_backend(name: str | None = None) -> Backend:
    """The backend called `name` (the default one when None).

    Raises BackendError for an unknown name (listing the known ones) or for a
    backend that cannot run here (saying what it needs).
    """
    name = _default if name is None else name
    inst = _INSTANCES.get(name)
    if inst is not None:
        return inst
    cls = _CLASSES.get(name)
    if cls is None:
        raise BackendError(
            f"unknown array backend {name!r}; registered backends are "
            f"{registered_backends()}. Did you forget to call register_backend()?")
    if not cls.available():
        raise BackendError(
            f"array backend {name!r} is not usable on this machine; "
            f"available here: {available_backends()}. {cls.requirement}")
    inst = _INSTANCES[name] = cls()
    for t in inst.array_types():
        _BY_TYPE[t] = inst
    return inst


def set_default_backend(name: str) -> None:
    """Make `name` the backend that new tensors and parameters are created on."""
    global _default
    get_backend(name)  # validates
    _default = name


def default_backend() -> Backend:
    return get_backend(_default)


def backend_of(array) -> Backend:
    """The backend that owns `array` (numpy for anything that is not a device array)."""
    inst = _BY_TYPE.get(type(array))
    if inst is not None:
        return inst
    for name, cls in _CLASSES.items():
        if name in _INSTANCES or not cls.available():
            continue
        inst = get_backend(name)
        if isinstance(array, inst.array_types()):
            return inst
    return get_backend("numpy")


def seed(value: int | None) -> None:
    """Reseed the generators of every usable backend."""
    for name in available_backends():
        get_backend(name).seed(value)


register_backend("numpy", NumpyBackend)
register_backend("cupy", CupyBackend)
get_backend("numpy")

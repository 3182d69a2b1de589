"""Which Batch-OMP implementation runs: one knob, ``omp_backend``, from the YAML to the engine.

* ``xla``: the jitted B-form of :mod:`.omp` (any JAX platform).
* ``cpu_kernel``: the fused per-column Numba kernel of :mod:`.cpu_kernel` (host CPU); inside K-SVD it
  also runs the fused power update, so a whole iteration stays on the host.
* ``gemm``: the GEMM-form of :mod:`.omp_gemm` (compute-bound; for GPU and TPU).
* ``auto``: ``cpu_kernel`` when JAX's default backend is the CPU (``xla`` with a warning if Numba is
  missing), ``gemm`` on GPU and TPU.
"""

from __future__ import annotations

import warnings

import jax

__all__ = ["OMP_BACKENDS", "check_omp_backend", "resolve_omp_backend", "sparse_code"]

OMP_BACKENDS = ("auto", "xla", "cpu_kernel", "gemm")


def check_omp_backend(backend: str) -> str:
    """Raise ValueError for a name that is not one of :data:`OMP_BACKENDS`."""
    if backend not in OMP_BACKENDS:
        raise ValueError(f"omp_backend must be one of {OMP_BACKENDS}, got {backend!r}.")
    return backend


def resolve_omp_backend(backend: str = "auto") -> str:
    """The concrete backend ``backend`` means on this machine (never ``auto``).

    ``cpu_kernel`` without Numba raises ImportError naming the install command; ``auto`` then falls
    back to ``xla`` with a warning.
    """
    from .cpu_kernel import numba_available, require_numba

    check_omp_backend(backend)
    if backend == "cpu_kernel":
        require_numba()
        return backend
    if backend != "auto":
        return backend
    if jax.default_backend() != "cpu":
        return "gemm"
    if numba_available():
        return "cpu_kernel"
    warnings.warn("omp_backend=auto: Numba is not installed, falling back to the slower XLA Batch-OMP "
                  "(pip install numba for the fused CPU kernel).", RuntimeWarning, stacklevel=2)
    return "xla"


def sparse_code(gram, correlations, sparsity: int, *, backend: str = "auto", **kwargs):
    """Batch-OMP with the chosen backend: gram [k, k], correlations [k, n] -> SparseCodes [n, s].

    ``kwargs`` go to the backend (dtype, eps; chunk_size / memory_budget_bytes for xla and gemm;
    threads for cpu_kernel).
    """
    backend = resolve_omp_backend(backend)
    if kwargs.get("memory_budget_bytes", 0) is None:
        del kwargs["memory_budget_bytes"]  # the backend's own default
    if backend == "cpu_kernel":
        from .cpu_kernel import batch_omp_cpu

        kwargs.pop("chunk_size", None)
        kwargs.pop("memory_budget_bytes", None)
        return batch_omp_cpu(gram, correlations, sparsity, **kwargs)
    kwargs.pop("threads", None)
    if backend == "gemm":
        from .omp_gemm import batch_omp_gemm

        return batch_omp_gemm(gram, correlations, sparsity, **kwargs)
    from .omp import batch_omp

    return batch_omp(gram, correlations, sparsity, **kwargs)

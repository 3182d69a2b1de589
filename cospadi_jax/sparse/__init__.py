"""Sparse-coding engine: whitening, Batch-OMP and K-SVD in pure JAX.

Matrices in, factors out; nothing here knows about LLMs. Shapes follow the
paper: target Y [d, n] (d = d_in, n = d_out), dictionary D [d, k] with unit-norm
atoms, coefficients S [k, n] with s non-zeros per column.
"""

from cospadi_jax.sparse.ksvd import KSVDResult, init_dictionary, ksvd, relative_error, update_dictionary
from cospadi_jax.sparse.omp import SparseCodes, batch_omp, omp, omp_chunk_size, resolve_float_dtype
from cospadi_jax.sparse.whitening import WhiteningResult, unwhiten_dictionary, whiten, whiten_target

__all__ = [
    "KSVDResult",
    "SparseCodes",
    "WhiteningResult",
    "batch_omp",
    "init_dictionary",
    "ksvd",
    "omp",
    "omp_chunk_size",
    "relative_error",
    "resolve_float_dtype",
    "unwhiten_dictionary",
    "update_dictionary",
    "whiten",
    "whiten_target",
]

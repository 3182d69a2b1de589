"""What every compression method returns, and the one interface they share.

Orientation (paper §3, used everywhere in cospadi-jax): W = HF ``weight.T`` with shape [d_in, d_out]; columns are
output neurons. A low-rank method returns W ≈ A·B with A: [d_in, r], B: [r, d_out]. CoSpaDi returns W ≈ D·S with
the dictionary D: [d_in, k] and a column-sparse S: [k, d_out] stored per output column as ``indices``
[d_out, s] (atom ids) and ``values`` [d_out, s].
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional

import jax
import numpy as np

from ..budget import Budget, budget
from ..models.paths import PROJECTION_TYPES
from ..sparse.whitening import unwhiten_dictionary, whiten

# The paper's grouping (Basis Sharing protocol): q, k, v, gate, up shared across consecutive layers; o, down private.
DEFAULT_SHARED_TYPES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
PARALLEL_MODES = ("none", "columns", "matrices")


@dataclass
class LowRankFactors:
    """W ≈ A @ B.  A: [d_in, r], B: [r, d_out]."""

    A: np.ndarray
    B: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.A.shape[0], self.B.shape[1]

    def dense(self) -> np.ndarray:
        """Reconstructed W̃ [d_in, d_out] (float64)."""
        return np.asarray(self.A, np.float64) @ np.asarray(self.B, np.float64)

    def n_params(self) -> int:
        return int(self.A.size + self.B.size)


@dataclass
class DictFactors:
    """W ≈ D @ S.  D: [d_in, k]; S column-sparse, column j = Σ_t values[j, t] · e_{indices[j, t]}.

    indices: [d_out, s] int32 (a padded slot of an early-stopped column has value 0), values: [d_out, s].
    snapshots: {t: DictFactors} the factors after t K-SVD iterations (``ksvd_snapshots``), each what a run with
    ``ksvd_iterations = t`` fits; the orchestrator saves them as artifacts of their own and never stores them here.
    """

    D: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    snapshots: dict[int, "DictFactors"] = field(default_factory=dict, repr=False)

    @property
    def k(self) -> int:
        return int(self.D.shape[1])

    @property
    def s(self) -> int:
        return int(self.indices.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.D.shape[0], self.indices.shape[0]

    def coefficients(self) -> np.ndarray:
        """Dense S [k, d_out] (float64)."""
        d_out = self.indices.shape[0]
        S = np.zeros((self.k, d_out), np.float64)
        cols = np.broadcast_to(np.arange(d_out)[:, None], self.indices.shape)
        np.add.at(S, (self.indices, cols), np.asarray(self.values, np.float64))
        return S

    def dense(self) -> np.ndarray:
        """Reconstructed W̃ [d_in, d_out] (float64)."""
        return np.asarray(self.D, np.float64) @ self.coefficients()

    def n_params(self) -> int:
        """Dictionary entries plus stored non-zeros (indices are counted in bytes by the budget, not here)."""
        return int(self.D.size + self.values.size)


Factors = LowRankFactors | DictFactors


@dataclass
class MethodConfig:
    """The knobs every method has. Each method's own config subclasses it with only the fields it reads
    (:class:`~cospadi_jax.methods.cospadi.CoSpaDiConfig`, :class:`~cospadi_jax.methods.lowrank.LowRankConfig`,
    ...); the same dataclasses are the Hydra schemas of ``conf/method/*.yaml`` (``cospadi_jax.config``), so a
    key that the method does not read (``method.rho`` for SVD-LLM) is refused when the config is composed.
    """

    name: str = ""  # the registry key (cospadi_jax.methods.METHODS)
    label: Optional[str] = None  # the config's name: key into paper tables and plot legends (default: name)
    ratio: float = 0.2  # fraction of parameters removed, per matrix (storage bytes, the paper's CR)
    group_size: int = 1  # m consecutive layers sharing a basis (grouped CoSpaDi, Basis Sharing)
    shared_types: list[str] = field(default_factory=lambda: list(DEFAULT_SHARED_TYPES))
    layers: Optional[list[int]] = None  # None = all layers
    proj_types: list[str] = field(default_factory=lambda: list(PROJECTION_TYPES))
    mode: str = "dense"  # DictLinear evaluation path: dense | factored | sparse | sparse_coo16 (layers.DICT_MODES)
    # None | bf16-14bit | int8: CoSpaDi's coefficient values quantised and dequantised (simulated: they stay
    # float32 in memory and in the artifact; the realised ratio counts the accounting's value bits, Eq. 10/11)
    quantization: Optional[str] = None
    # none | columns (one CoSpaDi K-SVD with its columns sharded over all devices) | matrices (independent
    # matrices/groups spread over processes and their local devices)
    parallel: str = "none"

    def validate(self, n_layers: int | None = None) -> None:
        """Raise naming the bad field before any work starts (the layer range needs ``n_layers``).

        The common fields are checked here, a method's own in its subclass (which calls this first)."""
        from ..layers import DICT_MODES, QUANTIZATIONS  # layers imports this package: import at call time
        from . import method_class

        method = method_class(self.name)
        if not isinstance(self, method.config_class):
            raise ValueError(f"method {self.name!r} is configured by {method.config_class.__name__}, got a "
                             f"{type(self).__name__}: choose the method's config file (method={self.name}) "
                             "instead of overriding method.name")
        check_number(self, "ratio")
        check_int(self, "group_size")
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1) (fraction of parameters removed), got {self.ratio}")
        for name in ("proj_types", "shared_types"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise TypeError(f"{name} must be a list of projection types such as ['q_proj'], got {value!r}")
        if not self.proj_types:
            raise ValueError(f"proj_types is empty: nothing would be compressed; choose from {PROJECTION_TYPES}")
        bad = [t for t in (*self.proj_types, *self.shared_types) if t not in PROJECTION_TYPES]
        if bad:
            raise ValueError(f"unknown projection type(s) {bad}; use {PROJECTION_TYPES}")
        if len(set(self.proj_types)) != len(self.proj_types):
            raise ValueError(f"proj_types lists a projection twice: {list(self.proj_types)}")
        self.check_layers(n_layers)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; use one of {QUANTIZATIONS}")
        if self.quantization and method.budget_kind != "cospadi":
            raise ValueError(f"quantization={self.quantization!r} applies to CoSpaDi's coefficient values; "
                             f"{self.name!r} stores dense low-rank factors, so it would be ignored. Use "
                             "quantization=null with low-rank methods.")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.mode not in DICT_MODES:
            raise ValueError(f"mode must be one of {DICT_MODES}, got {self.mode!r}")

    def budget_options(self) -> dict[str, Any]:
        """The keywords of :func:`cospadi_jax.budget.budget` for this method: its budget kind (and CoSpaDi's
        k/s ratio and accounting, in its subclass). A method never computes its own budget."""
        from . import method_class

        return {"kind": method_class(self.name).budget_kind}

    def unit_budget(self, d_in: int, d_out: int, group_size: int = 1, ratio: float | None = None) -> Budget:
        """The budget of a unit of ``group_size`` [d_in, d_out] matrices at ``ratio`` (default: this config's; a
        non-uniform allocation passes the unit's own), of this method's kind."""
        return budget(d_in, d_out, self.ratio if ratio is None else ratio, group_size=group_size,
                      **self.budget_options())

    def check_layers(self, n_layers: int | None) -> None:
        """The layer selection and grouping against the model's ``n_layers`` (None: what needs no model)."""
        from . import method_class

        if self.layers is not None:
            if isinstance(self.layers, (str, int)) or not isinstance(self.layers, (list, tuple)):
                raise TypeError(f"layers must be a list of layer indices such as [10, 11] (or None for all), "
                                f"got {self.layers!r}")
            not_int = [i for i in self.layers if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
            if not_int:
                raise TypeError(f"layer indices must be integers, got {not_int}")
            if not self.layers:
                raise ValueError("layers is empty: nothing would be compressed; use None (all layers) or a list")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers lists a layer twice: {list(self.layers)}")
        bad_layers = [i for i in (self.layers or ()) if i < 0 or (n_layers is not None and i >= n_layers)]
        if bad_layers:
            raise ValueError(f"layer index {bad_layers} out of range: the model has {n_layers} layers")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.group_size == 1:
            return
        if not method_class(self.name).supports_groups:
            raise ValueError(f"method {self.name!r} does not share bases; use group_size=1")
        n = len(self.layers) if self.layers is not None else n_layers
        if n is not None and n % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} does not divide the {n} compressed layers; "
                "choose a divisor or select layers so that groups are complete (no remainder rule is applied).")
        layers = list(self.layers or ())
        apart = [layers[g:g + self.group_size] for g in range(0, len(layers), self.group_size)
                 if layers[g:g + self.group_size] != list(range(layers[g], layers[g] + self.group_size))]
        if apart:  # a basis is shared by consecutive layers (Basis Sharing protocol), never across a gap
            raise ValueError(f"group_size={self.group_size} groups layers {apart}, which are not consecutive; "
                             "list consecutive layers in order, e.g. layers=[2, 3, 8, 9].")


def check_number(config: Any, name: str) -> None:
    """Raise unless ``config.<name>`` is a finite real number (a bool is not one)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_int(config: Any, name: str) -> None:
    """Raise unless ``config.<name>`` is an integer (a bool is not one)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class UnitStats:
    """Calibration statistics of a fitting unit beyond its Grams (what a method with ``needs_mean_abs`` reads).

    mean_abs: [d_in] float64, mean |x| of the unit's input over the calibration tokens (ASVD's scaling).
    """

    mean_abs: np.ndarray | None = None


class Method(ABC):
    """A compression method: the whole contract that the orchestrator (:mod:`cospadi_jax.compress`) relies on.

    A method is built from its own config (``Method(config)``, or :func:`cospadi_jax.methods.build`), reads its
    knobs from ``self.config`` and fits units through :meth:`fit_group`.

    Class attributes:
        name: the registry key (``method.name`` in the configs).
        config_class: the :class:`MethodConfig` subclass holding this method's knobs (its Hydra schema).
        data_aware: fits on the calibration Grams (False: ``grams`` are None and never needed).
        budget_kind: ``"low_rank"`` (the budget gives ``rank``) or ``"cospadi"`` (``n_atoms`` k and
            ``sparsity`` s) — the :func:`cospadi_jax.budget.budget` kind the orchestrator draws the unit's
            budget with; a method never computes its own budget.
        supports_groups: m > 1 same-shaped matrices may share one basis (grouped units).
        needs_mean_abs: ``stats.mean_abs`` must be given.

    A single matrix is a group of one: :meth:`fit_group` is the only fitting entry point. Build a method from a
    compression config with :func:`cospadi_jax.methods.build`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    data_aware: ClassVar[bool]
    budget_kind: ClassVar[str]
    supports_groups: ClassVar[bool] = False
    needs_mean_abs: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_class(name=self.name)

    @abstractmethod
    def fit_group(self, Ws: list[np.ndarray], grams: list[np.ndarray | None], budget: Any, key: Any,
                  stats: UnitStats = UnitStats()) -> list[Factors]:
        """Fit one unit: m weights Ws, each [d_in, d_out] (float32 or float64); their calibration Grams Σxᵀx
        [d_in, d_in] float64 (None entries for data-free methods); the unit's ``budget`` (group size m); a JAX
        PRNG ``key``; ``stats`` as :class:`UnitStats`. Returns one Factors per W (sharing the basis when m > 1),
        float64 or float32 arrays in the paper's orientation."""

    def _single(self, Ws: list[np.ndarray], grams: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray | None]:
        """The one matrix of a unit, for methods without groups."""
        if len(Ws) != 1 or len(grams) != 1:
            raise ValueError(f"{self.name} fits one matrix at a time, got a group of {len(Ws)}; use group_size=1")
        return Ws[0], grams[0]


def functional_error(W: np.ndarray, W_hat: np.ndarray, gram: np.ndarray) -> float:
    """Relative output error ‖X(W − W̃)‖_F / ‖XW‖_F from the Gram G = XᵀX alone: sqrt(tr(ΔᵀGΔ) / tr(WᵀGW))."""
    W = np.asarray(W, np.float64)
    delta = W - np.asarray(W_hat, np.float64)
    num = np.einsum("ij,ij->", delta, gram @ delta)
    den = np.einsum("ij,ij->", W, gram @ W)
    return float(np.sqrt(max(num, 0.0) / den))


def weight_error(W: np.ndarray, W_hat: np.ndarray) -> float:
    """Relative weight error ‖W − W̃‖_F / ‖W‖_F."""
    W = np.asarray(W, np.float64)
    return float(np.linalg.norm(W - W_hat) / np.linalg.norm(W))


_WHITENING_CACHE: OrderedDict[str, tuple[np.ndarray, dict[str, float]]] = OrderedDict()
_WHITENING_CACHE_SIZE = 8
_WHITENING_LOCK = threading.Lock()


def clear_whitening_cache() -> None:
    """Drop the memoised whitening factors (a Llama-3-8B down_proj factor alone is 1.6 GiB in float64): the
    layer-by-layer streaming calls it after each layer, whose Grams never come back."""
    with _WHITENING_LOCK:
        _WHITENING_CACHE.clear()


def whitening_factor(gram: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Upper-triangular L [d_in, d_in] with LᵀL = G (+ damping if needed), in float64, and the damping report.

    Whitening always runs in float64 (x64 enabled for this call only): calibration Grams of LLM activations
    have condition numbers far beyond float32's reach. q/k/v (and gate/up) share one Gram, so the last few
    factors are memoised by the Gram's content hash: the Cholesky and its eigen-diagnostics run once per input.
    """
    gram = np.ascontiguousarray(gram, np.float64)
    digest = hashlib.sha1(gram.data).hexdigest() + str(gram.shape)
    with _WHITENING_LOCK:  # parallel="matrices" fits units from several threads
        if digest in _WHITENING_CACHE:
            _WHITENING_CACHE.move_to_end(digest)
            L, info = _WHITENING_CACHE[digest]
            return L, dict(info)
    with jax.enable_x64(True):
        result = whiten(gram, dtype=np.float64)
        L = np.asarray(result.L, np.float64)
    info = {"jitter": result.jitter, "lambda_min": result.lambda_min, "condition_number": result.condition_number,
            "effective_rank": result.effective_rank}
    L.setflags(write=False)  # shared between callers
    with _WHITENING_LOCK:
        _WHITENING_CACHE[digest] = (L, info)
        while len(_WHITENING_CACHE) > _WHITENING_CACHE_SIZE:
            _WHITENING_CACHE.popitem(last=False)
    return L, dict(info)


def unwhiten(L: np.ndarray, X: np.ndarray) -> np.ndarray:
    """L⁻¹·X [d_in, m] by a float64 triangular solve (never an explicit inverse)."""
    with jax.enable_x64(True):
        return np.asarray(unwhiten_dictionary(np.asarray(L, np.float64), np.asarray(X, np.float64)), np.float64)

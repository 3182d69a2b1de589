"""Block-output refinement of fitted factors with optax: every support fixed, the factored numbers re-fitted.

The per-matrix objective ‖XW − XW̃‖ ignores what a decoder layer does with its projections' outputs: the attention
softmax, the SiLU gate and the residual stream. After every projection is fitted, :func:`refine_layers` optimises
the factored parameters of one decoder layer at a time (CoSpaDi's dictionaries D and the non-zero coefficient
values; a low-rank method's A and B) so that the compressed layer's output matches the dense layer's output:

    loss_l(θ) = Σ_tokens ‖f̂_l(x̂_l; θ) − f_l(x_l)‖² / Σ_tokens ‖f_l(x_l) − x_l‖²

- x_l: the dense model's hidden states entering layer l on the calibration windows; f_l: the dense layer.
- x̂_l: with ``inputs="compressed"`` (default), the hidden states of the compressed model whose layers < l are
  already refined, so that each layer also corrects what the layers before it got wrong (the rule of SparseGPT /
  GPTQ's sequential mode); with ``inputs="dense"``, x_l itself.
- The denominator is the dense layer's own residual update: 1.0 means "as far off as skipping the layer".

Shapes and supports never change (padded slots of early-stopped columns get a zero gradient and stay 0), so the
stored budget and the realised CR are exactly the fitted ones. Tensors shared by a group of layers (grouped
CoSpaDi's D, Basis Sharing's A) stay as fitted: refining one layer's copy would break the sharing the budget
counts once; the per-layer values (or B) of those layers are refined. Quantised coefficient values are rounded
back to their grid after the last step, and the reported loss is the rounded model's.

Adam under a linear warmup and cosine decay, with each tensor's step scaled by its RMS (``scale="rms"``: one
relative lr serves CoSpaDi's small D and coefficient entries and SVD-LLM's A and B alike), float32 (the model's dtype), minibatches of ``batch_size`` windows
drawn without replacement per epoch from a generator seeded by (seed, layer): the result is deterministic under
the seed. A layer whose loss turns non-finite, or whose full-calibration loss does not fall, keeps its fitted
factors, and its record says why.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from .layers import DictLinear, LowRankLinear, quantize_coefficients
from .methods.base import DictFactors, Factors, LowRankFactors, functional_error, weight_error
from .models.paths import get_module, projection_weight
from .models.transformer import CausalLM

log = logging.getLogger(__name__)

INPUTS = ("compressed", "dense")
SCALES = ("rms", "absolute")
# The factored numbers that refinement may change, by module type (supports and biases never change).
TRAINABLE = {DictLinear: ("D", "values"), LowRankLinear: ("A", "B")}
SHARED = {DictLinear: "D", LowRankLinear: "A"}  # the tensor a shared group holds once


@dataclass
class RefineConfig:
    """Block-output refinement (Hydra node ``refine``). ``steps=0`` is off: the paper's setting."""

    steps: int = 0  # Adam steps per decoder layer
    lr: float = 1e-2  # peak learning rate: relative to each tensor's RMS with scale=rms (docs/beyond.md)
    # rms: each tensor's Adam step is lr × its RMS (one lr fits D, S, A and B, whatever their scale);
    # absolute: plain Adam, a step of ≈ lr per number
    scale: str = "rms"
    warmup: float = 0.1  # fraction of the steps with a linear warmup, then cosine decay to lr / 100
    batch_size: int = 4  # calibration windows per step
    inputs: str = "compressed"  # compressed | dense: whose hidden states enter the layer (module docstring)

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"refine.{name} must be an integer, got {type(value).__name__} {value!r}")
        if self.steps < 0:
            raise ValueError(f"refine.steps must be >= 0 (0 turns refinement off), got {self.steps}")
        if not (isinstance(self.lr, (int, float)) and np.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"refine.lr must be a positive finite learning rate, got {self.lr!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"refine.warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.batch_size < 1:
            raise ValueError(f"refine.batch_size must be >= 1, got {self.batch_size}")
        if self.scale not in SCALES:
            raise ValueError(f"refine.scale must be one of {SCALES}, got {self.scale!r}")
        if self.inputs not in INPUTS:
            raise ValueError(f"refine.inputs must be one of {INPUTS}, got {self.inputs!r}")


@dataclass
class LayerRefinement:
    """What refining one decoder layer did. Losses as in the module docstring (full calibration set)."""

    layer: int
    status: str  # refined | no gain: kept the fitted factors | non-finite loss at step i: kept ... | nothing to refine
    loss_before: float
    loss_after: float
    trainable_params: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # minibatch loss per step


def refine_layers(
    dense: CausalLM,
    compressed: CausalLM,
    windows: np.ndarray,
    config: RefineConfig,
    *,
    seed: int,
    layers: list[int],
    shared: frozenset[str] = frozenset(),
    quantization: str | None = None,
    done: dict[int, dict[str, Factors]] | None = None,
    on_layer: Callable[[LayerRefinement, dict[str, Factors]], None] | None = None,
    progress: bool = True,
) -> list[LayerRefinement]:
    """Refine the compressed layers of ``compressed`` in place, in layer order; returns one record per layer.

    windows: [n, T] int token ids (full windows, no padding). ``layers``: the decoder layers holding compressed
    projections. ``shared``: HF paths of projections whose D (or A) is shared with other layers (kept fixed).
    ``quantization``: the coefficient grid values are rounded back to (layers.QUANTIZATIONS). ``done``: refined
    factors of layers finished by an interrupted run, by layer then path, loaded instead of re-optimised (the
    hidden states are recomputed through them, so the continuation is bit-identical). ``on_layer(record,
    factors)`` is called after each newly refined layer with its factors by path (e.g. to save them).
    """
    config.validate()
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] < 1:
        raise ValueError(f"refinement windows must be token ids [n, T] with n >= 1, got shape {windows.shape}")
    done = done or {}
    records = []
    bs = min(config.batch_size, windows.shape[0])
    h_dense = _embed(dense, windows, bs)
    h_comp = h_dense
    bar = tqdm(range(dense.config.num_hidden_layers), desc="refine", unit="layer", disable=not progress)
    for l in bar:
        dense_layer, layer = dense.model.layers[l], compressed.model.layers[l]
        target = _apply(dense_layer, h_dense, dense, bs)
        if l in layers:
            x = h_dense if config.inputs == "dense" else h_comp
            if l in done:
                _load_factors(compressed, done[l])
            else:
                record, factors = _refine_layer(l, layer, x, target, h_dense, compressed, config, seed=seed,
                                                shared=shared, quantization=quantization)
                records.append(record)
                bar.set_postfix_str(f"layer {l}: {record.loss_before:.4f} -> {record.loss_after:.4f}")
                if on_layer is not None:
                    on_layer(record, factors)
        h_comp = _apply(layer, h_comp, compressed, bs) if config.inputs == "compressed" else None
        h_dense = target
    return records


def factors_of(model: CausalLM, layer: int) -> dict[str, Factors]:
    """The factors held by decoder layer ``layer``'s factored projections, by HF path (float32 NumPy)."""
    out: dict[str, Factors] = {}
    for path, module in _factored(model, layer):
        if isinstance(module, DictLinear):
            out[path] = DictFactors(np.asarray(module.D[...], np.float32), np.asarray(module.support()),
                                    np.asarray(module.values[...], np.float32))
        else:
            out[path] = LowRankFactors(np.asarray(module.A[...], np.float32), np.asarray(module.B[...], np.float32))
    return out


def _factored(model: CausalLM, layer: int) -> list[tuple[str, nnx.Module]]:
    prefix = f"model.layers.{layer}"
    return [(f"{prefix}.{'.'.join(str(p) for p in path)}", m) for path, m in nnx.iter_graph(get_module(model, prefix))
            if isinstance(m, tuple(TRAINABLE))]


def _load_factors(model: CausalLM, factors: dict[str, Factors]) -> None:
    for path, f in factors.items():
        module = get_module(model, path)
        for name in TRAINABLE[type(module)]:
            getattr(module, name)[...] = jnp.asarray(getattr(f, name), getattr(module, name)[...].dtype)


def _refine_layer(l: int, layer: nnx.Module, x: jax.Array, target: jax.Array, x_dense: jax.Array,
                  model: CausalLM, config: RefineConfig, *, seed: int, shared: frozenset[str],
                  quantization: str | None) -> tuple[LayerRefinement, dict[str, Factors]]:
    t0 = time.perf_counter()
    modules = _factored(model, l)
    if any(m.mode not in ("dense", "factored") for _, m in modules if isinstance(m, DictLinear)):
        raise ValueError("refinement differentiates through DictLinear: build the compressed layers in mode "
                         "dense or factored (a sparse mode is set after refinement)")
    trainable = {(p, name) for p, m in modules for name in TRAINABLE[type(m)]
                 if not (p in shared and name == SHARED[type(m)])}
    prefix = f"model.layers.{l}."
    rel = {(p[len(prefix):], name) for p, name in trainable}

    def is_trainable(path: tuple, _value: Any) -> bool:
        return (".".join(str(p) for p in path[:-1]), str(path[-1])) in rel

    graphdef, params, rest = nnx.split(layer, is_trainable, ...)
    n_params = int(sum(a.size for a in jax.tree.leaves(params)))
    bs = min(config.batch_size, x.shape[0])
    norm = float(_sq_sum(target - x_dense, bs)) / target[..., 0].size  # the dense layer's update per token
    fitted = jax.tree.map(jnp.copy, params)
    loss_before = _full_loss(graphdef, params, rest, x, target, model, bs) / norm
    if not trainable:
        return LayerRefinement(l, "nothing to refine", loss_before, loss_before, 0, time.perf_counter() - t0), \
            factors_of(model, l)
    # Padded slots of early-stopped columns hold value 0 at a repeated atom; a zero gradient keeps them 0 under
    # Adam (its update is m / (sqrt(v) + eps) with m = 0), so the support never grows.
    masks = jax.tree_util.tree_map_with_path(
        lambda path, a: (a != 0).astype(a.dtype) if _leaf_name(path) == "values" else jnp.ones_like(a), params)
    warmup = int(config.warmup * config.steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(config.steps, warmup + 1),
                                                  end_value=config.lr / 100)
    optimizer = optax.adam(schedule) if config.scale == "absolute" else optax.chain(
        optax.scale_by_adam(), optax.scale_by_param_block_rms(), optax.scale_by_learning_rate(schedule))
    opt_state = optimizer.init(params)
    cos, sin, mask = _rotary(model, bs, x.shape[1])
    step = _train_step(graphdef, optimizer)
    rng = np.random.default_rng([seed, l])
    order: list[int] = []
    losses, status = [], "refined"
    for i in range(config.steps):
        if len(order) < bs:
            order += list(rng.permutation(x.shape[0]))
        batch, order = np.asarray(order[:bs]), order[bs:]
        params, opt_state, loss = step(params, rest, masks, opt_state, x[batch], target[batch], cos, sin, mask)
        losses.append(float(loss) / norm)
        if not np.isfinite(losses[-1]):
            status = f"non-finite loss at step {i}: kept the fitted factors"
            break
    if status == "refined":
        params = _round_values(params, quantization)
        loss_after = _full_loss(graphdef, params, rest, x, target, model, bs) / norm
        if not loss_after < loss_before:
            status = "no gain: kept the fitted factors"
    if status != "refined":
        params, loss_after = fitted, loss_before
        log.warning("refinement of layer %d: %s", l, status)
    nnx.update(layer, params)
    record = LayerRefinement(l, status, loss_before, loss_after, n_params, time.perf_counter() - t0, losses)
    return record, factors_of(model, l)


def _leaf_name(path: tuple) -> str:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return next((str(n) for n in reversed(names) if n in ("D", "values", "A", "B")), "")


def _round_values(params: Any, quantization: str | None) -> Any:
    if not quantization:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(quantize_coefficients(np.asarray(a), quantization), a.dtype)
        if _leaf_name(path) == "values" else a, params)


def _train_step(graphdef: Any, optimizer: optax.GradientTransformation) -> Callable:
    @jax.jit
    def step(params, rest, masks, opt_state, x, y, cos, sin, mask):
        def loss_fn(p):
            out = nnx.merge(graphdef, p, rest)(x, cos, sin, mask)
            return jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        grads = jax.tree.map(jnp.multiply, grads, masks)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@jax.jit
def _sq_sum_jit(a: jax.Array) -> jax.Array:
    return jnp.sum(a.astype(jnp.float32) ** 2)


def _sq_sum(a: jax.Array, bs: int) -> float:
    return sum(float(_sq_sum_jit(a[i:i + bs])) for i in range(0, a.shape[0], bs))


def _rotary(model: CausalLM, batch: int, seqlen: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    _, cos, sin, mask = model.embed(jnp.zeros((batch, seqlen), jnp.int32))
    return cos, sin, mask


def _embed(model: CausalLM, windows: np.ndarray, bs: int) -> jax.Array:
    return jnp.concatenate([model.embed(jnp.asarray(windows[i:i + bs]))[0] for i in range(0, len(windows), bs)])


_layer_forward = jax.jit(lambda graphdef, state, h, cos, sin, mask: nnx.merge(graphdef, state)(h, cos, sin, mask),
                         static_argnums=0)


def _apply(layer: nnx.Module, h: jax.Array, model: CausalLM, bs: int) -> jax.Array:
    """The layer over all windows, ``bs`` at a time: [n, T, H] -> [n, T, H]."""
    graphdef, state = nnx.split(layer)
    out = []
    for i in range(0, h.shape[0], bs):
        cos, sin, mask = _rotary(model, min(bs, h.shape[0] - i), h.shape[1])
        out.append(_layer_forward(graphdef, state, h[i:i + bs], cos, sin, mask))
    return jnp.concatenate(out)


def _full_loss(graphdef: Any, params: Any, rest: Any, x: jax.Array, y: jax.Array, model: CausalLM, bs: int) -> float:
    """Σ ‖f̂(x) − y‖² per token over every window (the unnormalised loss of the module docstring)."""
    total = 0.0
    for i in range(0, x.shape[0], bs):
        cos, sin, mask = _rotary(model, min(bs, x.shape[0] - i), x.shape[1])
        out = _merged_forward(graphdef, params, rest, x[i:i + bs], cos, sin, mask)
        total += float(_sq_sum_jit(out - y[i:i + bs]))
    return total / y[..., 0].size


_merged_forward = jax.jit(lambda graphdef, params, rest, h, cos, sin, mask:
                          nnx.merge(graphdef, params, rest)(h, cos, sin, mask), static_argnums=0)


def refine_compressed(dense: CausalLM, target: CausalLM, windows: np.ndarray, refine: RefineConfig, *,
                      quantization: str | None, seed: int, units: list[list[str]], report: Any, grams: Any,
                      heldout_grams: Any, artifact: Any, on_refined: Any, progress: bool) -> None:
    """Refinement as ``compress()`` runs it: ``target`` refined in place (:func:`refine_layers`), resumed from and
    saved to ``artifact``; the rows of ``report`` (a CompressionReport) for refined matrices then give the refined
    factors' errors on the calibration and held-out Grams, and ``report.refinement`` one record per layer.

    units: projection paths per fitting unit (a shared group's tensors stay as fitted); windows: [n, T] token ids."""
    shared = frozenset(p for unit in units if len(unit) > 1 for p in unit)
    layers = sorted({int(p.split(".")[2]) for unit in units for p in unit})
    done = artifact.refined_layers() if artifact is not None else {}
    records = {int(r["layer"]): r for r, _ in done.values()}

    def on_layer(record: Any, factors: dict[str, Factors]) -> None:
        records[record.layer] = asdict(record)
        if artifact is not None:
            artifact.save_refined(record.layer, factors, asdict(record))
        if on_refined is not None:
            on_refined(record)

    refine_layers(dense, target, windows, refine, seed=seed, layers=layers, shared=shared,
                  quantization=quantization, done={l: f for l, (_, f) in done.items()}, on_layer=on_layer,
                  progress=progress)
    report.refinement = [records[l] for l in sorted(records)]
    for row in report.matrices:
        layer = int(row.path.split(".")[2])
        if records.get(layer, {}).get("status") != "refined":
            continue
        W, W_hat = projection_weight(dense, row.path), _dense_of(get_module(target, row.path))
        row.functional_error_heldout_fitted = row.functional_error_heldout
        if grams is not None:
            row.functional_error_calib = functional_error(W, W_hat, grams.gram(row.path))
        if heldout_grams is not None:
            row.functional_error_heldout = functional_error(W, W_hat, heldout_grams.gram(row.path))
        row.weight_error = weight_error(W, W_hat)


def _dense_of(module: Any) -> np.ndarray:
    """W̃ [d_in, d_out] (float64) of a factored module."""
    if hasattr(module, "coefficients"):
        return np.asarray(module.D[...], np.float64) @ np.asarray(module.coefficients(), np.float64)
    return np.asarray(module.A[...], np.float64) @ np.asarray(module.B[...], np.float64)

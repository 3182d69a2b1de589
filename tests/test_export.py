"""Export and load: byte sizes equal the budget, factored exports load back bit-exactly, hf-dense exports load in
transformers-PyTorch with our logits, and bad input fails clearly (cospadi_jax/export.py)."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from helpers import TINY_FAMILIES, save_tiny_model_with_tokenizer, tiny_hf_config

from cospadi_jax import load_model, save_pretrained
from cospadi_jax.budget import budget
from cospadi_jax.export import encode_dict_factors, pack_14bit, unpack_14bit
from cospadi_jax.layers import quantize_coefficients, replace_projection
from cospadi_jax.methods.base import DictFactors, LowRankFactors
from cospadi_jax.models import CheckpointMismatchError, get_module, projection_path, random_model

BF16 = ml_dtypes.bfloat16
FACTOR_SUFFIXES = (".D", ".mask", ".indices", ".values", ".values_14bit", ".values_int8", ".scales", ".A", ".B")


def _tiny(family: str = "llama_gqa", tied: bool = False) -> nnx.Module:
    """A tiny random model with random biases and norm weights (a wrongly mapped one cannot hide behind 0 / 1)."""
    model = random_model(tiny_hf_config(family, tied), seed=0)
    rng = np.random.default_rng(1)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[-1] == "bias" or (path[-1] == "weight" and "norm" in str(path[-2])):
            shape = var.get_value().shape
            var.set_value(jnp.asarray(rng.normal(1.0 if path[-1] == "weight" else 0.0, 0.1, shape), jnp.float32))
    return model


def _dict_factors(d_in: int, d_outs: list[int], k: int, s: int, rng: np.random.Generator, *,
                  quantization: str | None = None, messy: bool = True) -> list[DictFactors]:
    """Factors of a unit of len(d_outs) matrices sharing one D [d_in, k]; with ``messy`` some columns carry a
    padded slot (atom 0, value 0) and, unquantised, some a repeated atom, as K-SVD's early-stopped columns can
    (the sum of two quantised values is off the grid: the export would round it, and warn)."""
    D = rng.normal(size=(d_in, k)).astype(np.float32) / np.sqrt(d_in)
    out = []
    for d_out in d_outs:
        indices = np.stack([rng.choice(k, s, replace=False) for _ in range(d_out)]).astype(np.int32)
        values = rng.normal(size=(d_out, s)).astype(np.float32)
        if messy:
            indices[::3, -1], values[::3, -1] = 0, 0.0  # padding
            if quantization is None:
                indices[1::5, -2] = indices[1::5, 0]  # a repeat: two slots of one atom, summed
        values = quantize_coefficients(values, quantization) if quantization else values
        out.append(DictFactors(D, indices, values))
    return out


def _low_rank(d_in: int, d_outs: list[int], r: int, rng: np.random.Generator) -> list[LowRankFactors]:
    A = rng.normal(size=(d_in, r)).astype(np.float32) / np.sqrt(d_in)
    return [LowRankFactors(A, rng.normal(size=(r, d)).astype(np.float32) / np.sqrt(r)) for d in d_outs]


def _compress_by_hand(model, proj_types, ratio, *, storage="eq11", group_size=1, kind="cospadi", quantization=None,
                      mode="dense", messy=True, layers=None, seed=0):
    """Replace projections by factors of the budget's sizes (units of ``group_size`` consecutive layers sharing
    D or A); returns the budgets of the units. Random factors: this tests storage, not fitting."""
    rng = np.random.default_rng(seed)
    layers = list(range(model.config.num_hidden_layers)) if layers is None else layers
    budgets = []
    for proj in proj_types:
        for g in range(0, len(layers), group_size):
            paths = [projection_path(i, proj) for i in layers[g:g + group_size]]
            d_in, d_out = get_module(model, paths[0]).kernel.get_value().shape
            b = budget(d_in, d_out, ratio, kind=kind, accounting=storage, group_size=len(paths))
            if kind == "cospadi":
                factors = _dict_factors(d_in, [d_out] * len(paths), b.n_atoms, b.sparsity, rng,
                                        quantization=quantization, messy=messy)
            else:
                factors = _low_rank(d_in, [d_out] * len(paths), b.rank, rng)
            for path, f in zip(paths, factors):
                replace_projection(model, path, f, mode=mode)
            budgets.append(b)
    return budgets


def _record(ratio, storage="eq11", quantization=None, group_size=1, method="cospadi"):
    return {"config": {"method": {"name": method, "ratio": ratio, "rho": 2.0, "accounting": storage,
                                  "quantization": quantization, "group_size": group_size, "mode": "dense"}},
            "git_sha": "0123abc", "realised_ratio": ratio}


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def _header_bytes(path: Path) -> int:
    with open(path / "model.safetensors", "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _logits(model, *, jit: bool = False) -> np.ndarray:
    """Logits [2, 20, vocab] of fixed ids. Eager by default (tiny models: op compilations are shared between
    tests); ``jit`` for the factored path, whose eager scan would compile once per projection."""
    from cospadi_jax.models import forward_logits

    ids = jnp.asarray((np.arange(40, dtype=np.int32).reshape(2, 20) * 7) % 90 + 3)
    return np.asarray(forward_logits(model, ids) if jit else model(ids))


# ------------------------------------------------------------------------------------------ encodings


def test_bitmask_and_values_follow_the_shared_convention():
    rng = np.random.default_rng(0)
    f = _dict_factors(6, [7], k=13, s=4, rng=rng)[0]  # k not a multiple of 8; pads and a repeat
    S = f.coefficients()  # [k, d_out], repeats summed
    tensors, decoded, exact = encode_dict_factors(f, "bf16", "bitmask")
    bits = (S != 0).T  # bits[j, t] = 1 iff column j uses atom t
    np.testing.assert_array_equal(tensors["mask"], np.packbits(bits, axis=1, bitorder="little"))
    assert tensors["mask"].shape == (7, 2) and tensors["mask"].dtype == np.uint8
    for j in range(7):
        atoms = np.flatnonzero(bits[j])  # increasing atom order
        row = tensors["values"][j].astype(np.float32)
        np.testing.assert_array_equal(row[:atoms.size], S[atoms, j].astype(np.float32).astype(BF16).astype(np.float32))
        assert not row[atoms.size:].any()
    assert not exact  # float32 values rounded to bf16
    np.testing.assert_array_equal(decoded.coefficients(), S.astype(np.float32).astype(BF16).astype(np.float64))
    coo, _, _ = encode_dict_factors(f, "bf16", "int16")
    assert coo["indices"].dtype == np.int16 and np.array_equal(coo["values"], tensors["values"])
    for j in range(7):
        atoms = np.flatnonzero(bits[j])
        np.testing.assert_array_equal(coo["indices"][j], np.pad(atoms, (0, 4 - atoms.size)))


def test_14bit_packing_is_8_values_in_14_bytes_little_endian():
    values = quantize_coefficients(np.random.default_rng(0).normal(size=21).astype(np.float32), "bf16-14bit")
    values[0] = 1.0
    packed = pack_14bit(values)
    assert packed.dtype == np.uint8 and packed.size == 14 * 3  # 21 values -> 3 groups of 8
    # An independent bit-stream reference: code i = bf16 bits >> 2 at bits 14i..14i+13, little-endian.
    codes = values.astype(BF16).view(np.uint16) >> 2
    stream = ((codes[:, None] >> np.arange(14)) & 1).astype(np.uint8).reshape(-1)
    np.testing.assert_array_equal(packed, np.packbits(np.pad(stream, (0, 14 * 24 - stream.size)), bitorder="little"))
    assert packed[0] == 0xE0 and packed[1] & 0x3F == 0x0F  # 1.0 = bf16 0x3F80 -> code 0x0FE0
    np.testing.assert_array_equal(unpack_14bit(packed, 21), values)
    with pytest.raises(ValueError, match="14-bit grid"):
        pack_14bit(np.array([1.0 + 2**-7], np.float32))


def test_int8_export_keeps_quantised_values_exactly():
    from cospadi_jax.export_format import _round_values

    v = np.random.default_rng(0).normal(size=(2000, 6)).astype(np.float32)
    q = quantize_coefficients(v, "int8")
    again, scales = _round_values(q, "int8")
    np.testing.assert_array_equal(again, q)  # every column's own scale found, one-ulp misses included
    np.testing.assert_array_equal(_round_values(v, "int8")[0], q)  # unquantised values: the layer's rounding
    np.testing.assert_array_equal(_round_values(again, "int8")[1], scales)  # the same bytes a second time


# ---------------------------------------------------------------------------------------------- bytes

# (storage, ratio, projections, group size, kind, quantization): shapes chosen so that k and s·d_out are
# multiples of 8 (tiny llama_gqa: q/o 64x64, k/v 64x32, gate/up 64x128, down 128x64), where the file's bytes
# and the budget's must be equal to the byte.
EXACT = {
    "eq11": ("eq11", 0.37, ("k_proj", "v_proj", "down_proj", "gate_proj", "up_proj"), 1, "cospadi", None),
    "eq11-14bit": ("eq11", 0.37, ("k_proj", "gate_proj", "up_proj"), 1, "cospadi", "bf16-14bit"),
    "eq10": ("eq10", 0.34, ("k_proj", "v_proj", "down_proj"), 1, "cospadi", None),
    "coo16": ("coo16", 0.3, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 1,
              "cospadi", None),
    "eq11-grouped": ("eq11", 0.25, ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), 2, "cospadi", None),
    "low-rank": ("eq11", 0.3, ("q_proj", "v_proj", "down_proj"), 1, "low_rank", None),
    "low-rank-shared": ("eq11", 0.3, ("k_proj", "up_proj"), 2, "low_rank", None),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_compressed_bytes_equal_the_budget_and_the_file_adds_only_dense_tensors_and_header(case, tmp_path):
    storage, ratio, projs, m, kind, quant = EXACT[case]
    model = _tiny()
    budgets = _compress_by_hand(model, projs, ratio, storage=storage, group_size=m, kind=kind, quantization=quant)
    method = "cospadi" if kind == "cospadi" else ("basis_sharing" if m > 1 else "svd_llm")
    manifest = save_pretrained(model, tmp_path / "x", metadata=_record(ratio, storage, quant, m, method))
    tensors = _tensors(tmp_path / "x")
    compressed = sum(a.nbytes for n, a in tensors.items() if n.endswith(FACTOR_SUFFIXES))
    accounted = sum(b.total_bytes for b in budgets)
    assert compressed == accounted == manifest["bytes"]["compressed_tensors"] == manifest["bytes"]["accounted"]
    dense = sum(2 * int(np.prod(v.get_value().shape)) for p, v in nnx.to_flat_state(nnx.state(model))
                if not str(p[-1]) in ("D", "indices", "values", "A", "B"))
    size = (tmp_path / "x" / "model.safetensors").stat().st_size
    assert size == compressed + dense + _header_bytes(tmp_path / "x") == manifest["bytes"]["file"]
    shared = [n for n in tensors if n.endswith((".D", ".A"))]
    assert len(shared) == len(budgets)  # a group's dictionary or basis is stored once
    assert len(manifest["groups"]) == (len(budgets) if m > 1 else 0)


def test_padding_and_int8_sizes_follow_the_stated_formula(tmp_path):
    model = _tiny()
    budgets = _compress_by_hand(model, ("q_proj", "o_proj", "gate_proj"), 0.3)  # k % 8 != 0 here
    manifest = save_pretrained(model, tmp_path / "eq11", metadata=_record(0.3))
    int8 = _tiny()
    _compress_by_hand(int8, ("q_proj", "o_proj", "gate_proj"), 0.3, quantization="int8")
    manifest8 = save_pretrained(int8, tmp_path / "int8", metadata=_record(0.3, quantization="int8"))
    eq11 = int8_bytes = 0
    for b in budgets:  # one per matrix (no groups): d1 = d_in, d2 = d_out
        d_in, d_out, k, s = b.d1, b.d2, b.n_atoms, b.sparsity
        eq11 += 2 * d_in * k + d_out * -(-k // 8) + 14 * -(-(s * d_out) // 8)
        int8_bytes += 2 * d_in * k + d_out * -(-k // 8) + s * d_out + 4 * d_out
    assert any(b.n_atoms % 8 for b in budgets)
    assert manifest["bytes"]["compressed_tensors"] == eq11 > manifest["bytes"]["accounted"]
    assert manifest8["bytes"]["compressed_tensors"] == int8_bytes
    assert manifest8["bytes"]["accounted"] == manifest["bytes"]["accounted"]  # int8 has no accounting of its own


# ----------------------------------------------------------------------------------------- round trip


def _rounded_reference(model_with_factors, projections: dict, values_encoding: str) -> nnx.Module:
    """The model the export must load back: every tensor rounded to its exported dtype, each CoSpaDi column's
    support in increasing atom order (built here from dense S, independently of the exporter)."""
    ref = _tiny()
    for path, var in nnx.to_flat_state(nnx.state(ref)):
        var.set_value(jnp.asarray(np.asarray(var.get_value()).astype(BF16).astype(np.float32)))
    for path, (f, mode) in projections.items():
        if isinstance(f, LowRankFactors):
            g = LowRankFactors(*(np.asarray(x).astype(BF16).astype(np.float32) for x in (f.A, f.B)))
        else:
            S = f.coefficients().astype(np.float32)
            if values_encoding == "bf16":
                S = S.astype(BF16).astype(np.float32)
            elif values_encoding == "bf16-14bit":
                S = quantize_coefficients(S, "bf16-14bit")
            indices, values = np.zeros((f.indices.shape), np.int32), np.zeros(f.values.shape, np.float32)
            for j in range(S.shape[1]):
                atoms = np.flatnonzero(S[:, j])
                indices[j, :atoms.size], values[j, :atoms.size] = atoms, S[atoms, j]
            g = DictFactors(np.asarray(f.D).astype(BF16).astype(np.float32), indices, values)
        replace_projection(ref, path, g, mode=mode)
    return ref


ROUND_TRIPS = {  # (storage, quantization, values encoding, kind, group size, mode, ratio)
    "eq11-rounds-f32-values": ("eq11", None, "bf16-14bit", "cospadi", 1, "dense", 0.3),
    "eq11-14bit": ("eq11", "bf16-14bit", "bf16-14bit", "cospadi", 1, "dense", 0.3),
    "eq10": ("eq10", None, "bf16", "cospadi", 1, "dense", 0.3),
    "coo16-factored-mode": ("coo16", None, "bf16", "cospadi", 1, "factored", 0.3),
    "eq10-sparse-mode": ("eq10", None, "bf16", "cospadi", 1, "sparse", 0.3),  # the bitmask kernel's layout
    "coo16-sparse_coo16-mode": ("coo16", None, "bf16", "cospadi", 1, "sparse_coo16", 0.3),
    "int8": ("eq11", "int8", "exact", "cospadi", 1, "dense", 0.3),
    "grouped": ("eq11", "bf16-14bit", "bf16-14bit", "cospadi", 2, "dense", 0.25),
    "low-rank-shared": ("eq11", None, None, "low_rank", 2, "dense", 0.3),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_factored_export_loads_back_bit_exactly_and_saves_the_same_bytes(case, tmp_path, caplog):
    from cospadi_jax.export import compressed_projections

    storage, quant, encoding, kind, m, mode, ratio = ROUND_TRIPS[case]
    model = _tiny()
    _compress_by_hand(model, ("q_proj", "v_proj", "up_proj", "down_proj") if m == 1 else ("k_proj", "up_proj"),
                      ratio, storage=storage, group_size=m, kind=kind, quantization=quant, mode=mode)
    projections = compressed_projections(model)
    with caplog.at_level("WARNING", logger="cospadi_jax.export"):
        manifest = save_pretrained(model, tmp_path / "a", metadata=_record(ratio, storage, quant, m))
    assert ("export rounds them" in caplog.text) == (case in ("eq11-rounds-f32-values", "eq10", "coo16-factored-mode",
                                                              "coo16-sparse_coo16-mode"))
    loaded, tokenizer = load_model(tmp_path / "a")
    assert tokenizer is None
    reference = _rounded_reference(model, projections, encoding)
    for path in projections:
        ours, theirs = get_module(loaded, path), get_module(reference, path)
        assert type(ours) is type(theirs) and getattr(ours, "mode", None) == getattr(theirs, "mode", None)
    ref_state = dict(nnx.to_flat_state(nnx.state(reference)))
    for path, var in nnx.to_flat_state(nnx.state(loaded)):
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(ref_state[path].get_value()),
                                      err_msg=str(path))
    assert np.array_equal(_logits(loaded, jit=mode == "factored"), _logits(reference, jit=mode == "factored"))
    save_pretrained(loaded, tmp_path / "b", metadata=manifest)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_a_compression_report_is_the_record(tmp_path):
    """compress() itself (SVD: no K-SVD to compile in a unit test), its report passed as the metadata."""
    from cospadi_jax.compress import compress

    small, report = compress(_tiny("qwen2_bias"), None, method="svd", ratio=0.3, proj_types=("k_proj", "gate_proj"),
                             progress=False)
    manifest = save_pretrained(small, tmp_path / "x", metadata=report)
    record = manifest["record"]
    assert (record["method"], record["ratio"]) == ("svd", 0.3)
    assert "accounting" not in record  # CoSpaDi's knob: a low-rank method's config has none
    assert record["realised_ratio"] == pytest.approx(report.realised_ratio)
    assert manifest["bytes"]["compressed_tensors"] == manifest["bytes"]["accounted"]
    assert manifest["bytes"]["realised_ratio_file"] == pytest.approx(report.realised_ratio)
    assert json.loads((tmp_path / "x" / "cospadi.json").read_text()) == json.loads(json.dumps(manifest))
    with pytest.raises(ValueError, match="belongs to another compression"):
        save_pretrained(small, tmp_path / "y", metadata=_record(0.2, method="svd"))


# -------------------------------------------------------------------------------------------- hf-dense


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_hf_dense_loads_in_transformers_with_our_logits(family, tied, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = _tiny(family, tied)
    _compress_by_hand(model, ("q_proj", "up_proj"), 0.3, layers=[0])
    _compress_by_hand(model, ("down_proj", "o_proj"), 0.3, kind="low_rank", layers=[1])
    save_pretrained(model, tmp_path, "hf-dense")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = (np.arange(40, dtype=np.int32).reshape(2, 20) * 7) % 90 + 3
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids).long()).logits.numpy()
    err = np.abs(_logits(model) - theirs).max()
    assert err < 1e-4, f"{family}/{'tied' if tied else 'untied'}: max |logit diff| = {err:.2e}"
    # no memory saved: a dense float32 checkpoint of the original size
    dense = sum(p.numel() for p in ref.parameters()) * 4
    assert (tmp_path / "model.safetensors").stat().st_size == dense + _header_bytes(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"][0].endswith("ForCausalLM")


def test_the_model_carries_its_hf_config_and_stays_jit_hashable(tmp_path):
    from cospadi_jax.models import decoder_config_from_hf, forward_logits

    hf = tiny_hf_config("qwen3_qknorm", True)
    cfg = decoder_config_from_hf(hf)
    assert json.loads(cfg.hf_config_json) == json.loads(hf.to_json_string(use_diff=False))
    bare = dataclasses.replace(cfg, hf_config_json=None)
    assert bare == cfg and hash(bare) == hash(cfg) and "hf_config_json" not in repr(cfg)  # fingerprints unchanged
    model = random_model(hf)
    assert model.config.hf_config_json == cfg.hf_config_json
    forward_logits(model, jnp.ones((1, 4), jnp.int32))  # the graphdef (config inside) is a jit cache key
    save_pretrained(model, tmp_path, "hf-dense")
    reloaded, _ = load_model(tmp_path)  # an HF directory
    assert json.loads(reloaded.config.hf_config_json)["head_dim"] == 32


# ------------------------------------------------------------------------------------------- bad input


def test_an_existing_directory_needs_overwrite_and_failures_leave_nothing(tmp_path, monkeypatch):
    import cospadi_jax.export as export

    model = _tiny()
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty .*keep.txt.*overwrite=True"):
        save_pretrained(model, target)
    assert (target / "keep.txt").read_text() == "mine"

    def broken(tensors, path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_save_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half-written or temporary directory
    monkeypatch.undo()
    save_pretrained(model, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_pretrained(model, tmp_path / "file", overwrite=True)
    with pytest.raises(ValueError, match="unknown export format"):
        save_pretrained(model, tmp_path / "z", "gguf")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _tiny()
    _compress_by_hand(model, ("q_proj", "up_proj"), 0.3)
    path = tmp_path_factory.mktemp("export") / "x"
    save_pretrained(model, path, metadata=_record(0.3))
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    import shutil

    from safetensors.numpy import save_file

    shutil.copytree(src, dst)
    tensors = _tensors(src)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"model.layers.0.mlp.up_proj.D": t["model.layers.0.mlp.up_proj.D"][:, :-1]}),
     r"'model.layers.0.mlp.up_proj.D' has shape \(64, \d+\).*imply"),
    (lambda t: t.pop("model.layers.1.self_attn.q_proj.mask"), r"q_proj.mask' of model.layers.1.self_attn.q_proj .* missing"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}), r"unexpected keys \['model.layers.0.mlp.extra.weight'\]"),
    (lambda t: t.pop("model.norm.weight"), r"missing keys \['model.norm.weight'\]"),
    (lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:-1]}), r"embed_tokens.weight' has shape \(95, 64\)"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 64), BF16)}), "both dense and factored"),
], ids=["factor-shape", "factor-missing", "extra", "dense-missing", "dense-shape", "doubled"])
def test_a_factored_export_that_does_not_match_its_config_is_refused(exported, tmp_path, edit, message):
    broken = _rewrite(exported, tmp_path / "broken", edit)
    with pytest.raises(CheckpointMismatchError, match=message):
        load_model(broken)


def test_a_truncated_or_inconsistent_export_is_refused(exported, tmp_path):
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(exported, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match="truncated or corrupt"):
        load_model(truncated)
    manifest = json.loads((exported / "cospadi.json").read_text())
    manifest["projections"]["model.layers.7.mlp.up_proj"] = manifest["projections"]["model.layers.0.mlp.up_proj"]
    bad = tmp_path / "layer"
    shutil.copytree(exported, bad)
    (bad / "cospadi.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointMismatchError, match="lists 'model.layers.7.mlp.up_proj', which the model"):
        load_model(bad)


# ------------------------------------------------------------------------------------------- Hydra task


def test_hydra_export_task_writes_both_formats_from_an_artifact(tmp_path):
    from hydra import compose, initialize_config_dir

    import cospadi_jax.run as run_app
    from cospadi_jax.checkpoint import ArtifactWriter, restore_model
    from cospadi_jax.compress import compress

    tiny = save_tiny_model_with_tokenizer(tmp_path / "tiny", family="llama_gqa", tied=True, layers=2)
    artifact = tmp_path / "artifact"
    metadata = {"config": _record(0.3, method="svd")["config"], "git_sha": "0123abc",
                "model": {"spec": str(tiny), "dtype": "float32", "revision": None}}
    writer = ArtifactWriter(artifact, metadata)
    model, tokenizer = load_model(tiny)
    _, report = compress(model, None, method="svd", ratio=0.3, layers=(0,), proj_types=("q_proj", "up_proj"),
                         artifact=writer, progress=False)
    writer.finalize(report.to_dict())

    def compose_export(*overrides, hydra=False):
        conf = str(Path(run_app.__file__).parent / "conf")
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            return compose("config", overrides=["task=export", f"artifact={artifact}", "logger.mode=disabled",
                                                 *overrides], return_hydra_config=hydra)

    def run(*overrides):
        return run_app.execute(compose_export(*overrides))

    # Hydra's job directory (.hydra/, run.log) is the artifact's export/, never the export directory itself
    assert compose_export(hydra=True).hydra.run.dir == f"{artifact}/export"

    dense = run("export.format=hf-dense")
    assert dense["export"] == str(artifact / "export-hf-dense") and dense["record"]["git_sha"] == "0123abc"
    assert (artifact / "export-hf-dense" / "tokenizer.json").is_file()
    factored = run(f"export.path={tmp_path / 'mine'}")
    assert factored["record"]["realised_ratio"] == pytest.approx(report.realised_ratio)
    assert factored["bytes"]["compressed_tensors"] == factored["bytes"]["accounted"]
    restored, _, _ = restore_model(artifact)
    loaded, tok = load_model(tmp_path / "mine")
    assert tok is not None and tok("In the beginning").input_ids == tokenizer("In the beginning").input_ids
    assert np.abs(_logits(loaded) - _logits(restored)).max() < 1e-2
    with pytest.raises(FileExistsError, match="export.overwrite=true"):
        run(f"export.path={tmp_path / 'mine'}")
    run(f"export.path={tmp_path / 'mine'}", "export.overwrite=true")
    with pytest.raises(ValueError, match="export.format='gguf'"):
        run("export.format=gguf")
    with pytest.raises(ValueError, match="task=export needs artifact"):
        run_app.validate(dataclasses.replace(run_app.RunConfig(), task="export"))

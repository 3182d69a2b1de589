"""Refinement learning-rate probe (docs/beyond.md): CoSpaDi or SVD-LLM on SmolLM2 layers 0-2, CR 0.3, T = 4,
32 x 512 calibration tokens, 50 refinement steps per setting; prints each layer's loss before and after.

    python experiments/refine_lr_probe.py cospadi rms:1e-3 rms:1e-2 absolute:1e-4
"""
import sys, time
from flax import nnx
from cospadi_jax import load_model
from cospadi_jax.compress import compress, CalibrationSpec
from cospadi_jax.refine import RefineConfig, refine_layers
from cospadi_jax.data.calibration import sample_windows
from cospadi_jax.data import load_text
method = sys.argv[1]
model, tok = load_model("smollm2-135m")
cal = CalibrationSpec(nsamples=32, seqlen=512, cache_dir=".cache/grams", heldout_source=None)
layers = [0, 1, 2]
comp, rep = compress(model, tok, calibration=cal, method=method, ratio=0.3, ksvd_iterations=4, layers=tuple(layers), progress=False)
windows = sample_windows(tok, load_text(cal.source), cal.nsamples, cal.seqlen, cal.seed)
for scale, lr in [tuple(a.split(":")) for a in sys.argv[2:]]:
    c = nnx.clone(comp)
    t0 = time.time()
    recs = refine_layers(model, c, windows, RefineConfig(steps=50, lr=float(lr), scale=scale), seed=42, layers=layers, progress=False)
    print(method, scale, lr, [(round(r.loss_before,4), round(r.loss_after,4), r.status[:8]) for r in recs], f"{time.time()-t0:.0f}s", flush=True)

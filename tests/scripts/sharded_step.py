"""One training step on several meshes of 8 simulated CPU devices vs one device.

Run by tests/test_sharding.py in a subprocess (XLA_FLAGS must be set before JAX is imported).
Prints one line per mesh: name, max relative loss error, max param error; exits 1 on mismatch.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import optim, sharding  # noqa: E402
from jaxlm.model import Model, ModelConfig  # noqa: E402
from jaxlm.steps import lm  # noqa: E402
from jaxlm.train_state import create_train_state  # noqa: E402

RTOL, ATOL = 1e-5, 1e-7


def batch(seed=0, rows=8, length=16, vocab=128):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(4, vocab, (rows, length)).astype(np.int32)
    # Two packed documents per row and some padding, so segment masks are exercised too.
    seg = np.ones((rows, length), np.int32)
    seg[:, 9:] = 2
    seg[:, 14:] = 0
    pos = np.concatenate([np.arange(9), np.arange(5), np.zeros(2, int)])[None].repeat(rows, 0).astype(np.int32)
    mask = (seg > 0).astype(np.int32)
    mask[:, 0] = mask[:, 9] = 0
    return {"tokens": tokens, "positions": pos, "segment_ids": seg, "loss_mask": mask}


def run(mesh, model, optimizer, data):
    state, state_sh = create_train_state(model, optimizer, mesh, seed=0)
    with sharding.use_rules(mesh):
        step = jax.jit(lm.make_train_step(model, optimizer, grad_accum=2),
                       in_shardings=(state_sh, sharding.batch_sharding(mesh)), out_shardings=(state_sh, None))
        state, metrics = step(state, sharding.global_batch(data, mesh))
    return float(metrics["loss"]), jax.device_get(state.params), state.params


def main():
    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig(vocab_size=128, num_layers=2, d_model=64, num_heads=8, num_kv_heads=4, mlp_dim=128)
    model = Model(cfg)
    # Adam's first update is lr·g/(|g| + eps): with eps = 1e-8 it turns the float-summation-order
    # noise of near-zero gradients (~1e-10, different on every mesh) into parameter differences
    # of ~1e-4. A larger eps keeps the comparison about sharding, not about that amplification.
    optimizer, _ = optim.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10, eps=1e-3)
    data = batch()
    ref_loss, ref_params, _ = run(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), model, optimizer, data)
    meshes = {"data=8": (8, 1, 1), "fsdp=8": (1, 8, 1), "tensor=8": (1, 1, 8), "data2_fsdp2_tensor2": (2, 2, 2)}
    ok = True
    for name, (d, f, t) in meshes.items():
        loss, params, live = run(sharding.make_mesh(d, f, t), model, optimizer, data)
        wq = live["blocks"]["attn"]["wq"].sharding.spec
        loss_err = abs(loss - ref_loss) / abs(ref_loss)
        param_err = max(float(np.max(np.abs(a - b) / (ATOL + RTOL * np.abs(b))))
                        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
        good = loss_err <= RTOL and param_err <= 1.0
        ok &= good
        print(f"{name}: loss {loss:.6f} vs {ref_loss:.6f} rel_err {loss_err:.2e}; param err/tol {param_err:.3f}; "
              f"wq spec {wq}; {'OK' if good else 'MISMATCH'}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""Import a Hugging Face directory onto meshes of 8 simulated CPU devices vs one device.

Run by tests/test_hf.py in a subprocess (XLA_FLAGS must be set before JAX is imported):

    python tests/scripts/hf_sharded_import.py HF_DIR

For each mesh: every parameter equals the single-device import bit for bit and carries the
sharding the rules table gives it; no device's callback reads more of a sharded matrix than its
own shard (nothing is assembled whole and then split); and the forward pass on the sharded
parameters matches. Prints one line per mesh; exits 1 on any mismatch.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import hf, sharding  # noqa: E402
from jaxlm.model import Model  # noqa: E402


def main(path: str):
    assert jax.device_count() == 8, jax.devices()
    cfg = hf.model_config_from_hf(hf.read_hf_config(path))
    model = Model(cfg)
    reads = []
    original_read = hf.SafetensorsDir.read

    def recording_read(self, name, index=None):
        x = original_read(self, name, index)
        reads.append((name, x.nbytes, int(np.prod(self.shape(name))) * 4))
        return x

    hf.SafetensorsDir.read = recording_read
    reference = hf.load_params(path, cfg)  # mesh=None: one device
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, (8, 12)).astype(np.int32)
    segments = np.ones_like(tokens)
    segments[:, :3] = 0  # left padding
    positions = np.maximum(np.cumsum(segments, 1) - 1, 0).astype(np.int32)
    ref_logits = np.asarray(jax.jit(lambda p: model.apply(p, tokens, positions, segments).logits)(reference))

    ok = True
    for name, (d, f, t) in {"fsdp=8": (1, 8, 1), "tensor=8": (1, 1, 8), "data2_fsdp2_tensor2": (2, 2, 2)}.items():
        mesh = sharding.make_mesh(d, f, t)
        reads.clear()
        params = hf.load_params(path, cfg, mesh)
        targets = sharding.tree_shardings(mesh, model.logical_axes(), model.abstract_params())
        same_values = all(np.array_equal(np.asarray(a), np.asarray(b))
                          for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)))
        same_sharding = all(a.sharding.is_equivalent_to(s, a.ndim)
                            for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(targets)))
        # Matrices all have an 'embed' axis: on fsdp=8 each read must be an eighth of the tensor.
        worst = max(n / full for tensor, n, full in reads if "norm" not in tensor and "bias" not in tensor)
        small_reads = worst <= 1 / 8 + 1e-9 if f == 8 else worst <= 1.0
        with sharding.use_rules(mesh):
            logits = np.asarray(jax.jit(lambda p: model.apply(p, tokens, positions, segments).logits)(params))
        real = segments.astype(bool)
        logit_err = float(np.max(np.abs(logits[real] - ref_logits[real])))
        good = same_values and same_sharding and small_reads and logit_err <= 1e-5
        ok &= good
        wq = params["blocks"]["attn"]["wq"].sharding.spec
        print(f"{name}: bitwise={same_values} shardings={same_sharding} (wq {wq}) largest read/tensor={worst:.3f} "
              f"logit err={logit_err:.1e} {'OK' if good else 'MISMATCH'}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1])

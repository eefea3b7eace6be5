"""`jaxlm.loop.train` on a toy problem, for tests/test_loop.py: one process or several.

A linear model y = x·w fitted by Adam to records (x_i, y_i), i = 0..N-1; process p of n reads
records p, p+n, ... (as every jaxlm data pipeline does), `--batch` rows in all per step. Its
iterator's position (the next record) is saved in checkpoints like a grain iterator's. The
evaluation sums squared errors over the held-out records, whose shards end after different
numbers of batches on different processes. `--nan_at_step` feeds a batch of NaNs at that step.

    python tests/scripts/loop_toy.py --workdir=DIR --steps=12 [--processes=2 --process_id=i --port=P]
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxlm import checkpoint, loop, sharding  # noqa: E402
from jaxlm.train_state import TrainState  # noqa: E402

DIM, NUM_RECORDS, NUM_VALID = 4, 64, 5


def records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x, (x @ np.arange(1, DIM + 1, dtype=np.float32) + 0.1 * rng.normal(size=n)).astype(np.float32)


class Batches:
    """Endless local batches of this process's records, in order; `get_state`/`set_state` for checkpoints."""

    def __init__(self, x, y, batch: int, index: int, count: int, endless: bool = True, nan_at: int = 0):
        self.x, self.y = x[index::count], y[index::count]
        self.batch, self.endless, self.nan_at = batch // count, endless, nan_at
        self.position, self.served = 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        if not self.endless and self.position >= len(self.x):
            raise StopIteration
        idx = [(self.position + i) % len(self.x) for i in range(self.batch)]
        self.position += self.batch
        self.served += 1
        x, y = self.x[idx], self.y[idx]
        mask = np.ones(self.batch, np.float32)
        if not self.endless:  # the last held-out batch: rows past the shard's end count nowhere
            mask = (self.position - self.batch + np.arange(self.batch) < len(self.x)).astype(np.float32)
        if self.served == self.nan_at:
            x = np.full_like(x, np.nan)
        return {"x": x, "y": y, "mask": mask}

    def get_state(self) -> dict:
        return {"position": self.position, "served": self.served}

    def set_state(self, state: dict):
        self.position, self.served = int(state["position"]), int(state["served"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--log_every", type=int, default=2)
    p.add_argument("--checkpoint_every", type=int, default=4)
    p.add_argument("--crash_after_step", type=int, default=0)
    p.add_argument("--sigterm_after_step", type=int, default=0)
    p.add_argument("--nan_at_step", type=int, default=0)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    if a.processes > 1:
        sharding.maybe_initialize_distributed(f"localhost:{a.port}", a.processes, a.process_id)
    mesh = sharding.make_mesh()
    rep, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    tx = optax.adam(0.1)

    def init():
        params = {"w": jnp.zeros((DIM,), jnp.float32)}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(0))

    state_sh = jax.tree.map(lambda _: rep, jax.eval_shape(init))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), jax.eval_shape(init),
                            state_sh)

    def sse(params, batch):
        err = batch["x"] @ params["w"] - batch["y"]
        return jnp.sum(batch["mask"] * err ** 2), jnp.sum(batch["mask"])

    @jax.jit
    def step(state, batch):
        (loss_sum, n), grads = jax.value_and_grad(lambda p: sse(p, batch), has_aux=True)(state.params)
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return (state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state), {"loss": loss_sum / n})

    eval_fn = jax.jit(lambda params, batch: sse(params, batch))
    x, y = records(NUM_RECORDS, 0)
    vx, vy = records(NUM_VALID, 1)
    count, index = jax.process_count(), jax.process_index()
    place = lambda batch: sharding.global_batch(batch, mesh)

    def evaluate(state, _step):
        totals = loop.sum_batches(lambda b: eval_fn(state.params, b), Batches(vx, vy, a.batch, index, count, False),
                                  place=place, empty=lambda: {"x": np.zeros((a.batch // count, DIM), np.float32),
                                                              "y": np.zeros(a.batch // count, np.float32),
                                                              "mask": np.zeros(a.batch // count, np.float32)})
        return {"eval_loss": totals["0"] / totals["1"], "eval_rows": totals["1"], "eval_batches_local":
                float(-(-len(vx[index::count]) // (a.batch // count)))}

    cadence = loop.Cadence(steps=a.steps, log_every=a.log_every, eval_every=a.checkpoint_every,
                           checkpoint_every=a.checkpoint_every, crash_after_step=a.crash_after_step,
                           sigterm_after_step=a.sigterm_after_step)
    ckpt = checkpoint.Checkpointer(os.path.join(a.workdir, "checkpoints"))
    outcome = loop.train(a.workdir, ckpt, cadence, step_fn=step, batches=Batches(x, y, a.batch, index, count,
                                                                                 nan_at=a.nan_at_step),
                         init_state=lambda: jax.device_put(init(), state_sh), abstract_state=abstract,
                         meta={"stage": "toy"}, desc="toy", place=place, evaluate=evaluate)
    print(f"outcome: stopped={outcome.stopped} start={outcome.start_step}", flush=True)


if __name__ == "__main__":
    main()

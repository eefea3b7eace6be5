"""The train state every stage starts from, created already sharded over the mesh.

Following big_vision and MaxText: `jax.eval_shape` gives the state's shapes, the rules table
gives each leaf's sharding, and `jax.jit(init, out_shardings=...)` materialises it directly in
place, so a model larger than one device never exists unsharded.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxlm import sharding


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # [] int32: optimizer updates done
    params: Any  # nested dict of arrays (see jaxlm.model.Model)
    opt_state: Any
    rng: jax.Array  # [2] uint32 raw PRNG key; each step uses fold_in(rng, step)


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params, param_shardings, mesh: Mesh):
    """Shard optimizer moments like their parameters; scalars (counts) are replicated."""
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    return optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                 transform_non_params=lambda _: sharding.replicated(mesh))


def state_shardings(model, optimizer, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> TrainState:
    abstract_params = model.abstract_params()
    param_sh = sharding.tree_shardings(mesh, model.logical_axes(), abstract_params, rules)
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=param_sh,
                      opt_state=opt_state_shardings(optimizer, abstract_params, param_sh, mesh), rng=rep)


def create_train_state(model, optimizer: optax.GradientTransformation, mesh: Mesh, seed: int,
                       rules=sharding.DEFAULT_RULES, init_params: Callable[[jax.Array], Any] | None = None
                       ) -> tuple[TrainState, TrainState]:
    """A freshly initialised, sharded TrainState and its shardings (same tree structure).

    `init_params(rng)` overrides the model's random init (e.g. to start from other weights).
    """
    shardings = state_shardings(model, optimizer, mesh, rules)
    init_params = init_params or model.init

    def init() -> TrainState:
        rng = jax.random.PRNGKey(seed)
        params = init_params(jax.random.fold_in(rng, 0))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.fold_in(rng, 1))

    with sharding.use_rules(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return state, shardings


def train_state_from_params(params, optimizer: optax.GradientTransformation, shardings: TrainState,
                            rng: jax.Array) -> TrainState:
    """Step 0 from `params` already on `shardings.params` (e.g. a previous stage's weights):
    the optimizer state made in place, `rng` as the run's root key."""
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
                      opt_state=opt_state, rng=jax.device_put(rng, shardings.rng))


def abstract_train_state(model, optimizer: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """The restore target of a TrainState: shapes and dtypes only (nothing is initialised), with shardings."""
    params = model.abstract_params()
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=jax.eval_shape(optimizer.init, params),
                        rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    return abstract_with_shardings(shapes, shardings)


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying shardings: the restore target for orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def step_rng(state: TrainState) -> jax.Array:
    return jax.random.fold_in(state.rng, state.step)


def is_sharding(x) -> bool:
    return isinstance(x, NamedSharding)

"""LoRA: low-rank adapters on the Transformer's projections, the base weights frozen.

    W x  →  W x + (α / r) · B(A(dropout(x)))        A: [in, r] random, B: [r, out] zero

as Hu et al. (2021) and Hugging Face peft (`lora_A`, `lora_B`, `scaling = lora_alpha / r`), so
adapters zero-initialised give the base model exactly, and `merge` (W + (α/r)·A·B) gives the
same function as the unmerged pass.

How a stage uses it (every post-training stage does the same, and GRPO plugs in alike):
- The train state's `params` are the adapters only (`Adapted`, a handle with `init`,
  `abstract_params` and `logical_axes` like `jaxlm.model.Model`), so the optimizer state, the
  shardings and the checkpoints hold the adapters and nothing else. The reward model's are
  `{"trunk": adapters, "head": head}` (`ScalarHeadModel(cfg, trunk=Adapted(...))`).
- The frozen base is an argument of the jitted step, not part of the (donated) state:
  `with_frozen_base(make_step, adapted)` turns a stage's `make_step(model) -> step(state, batch,
  *rest)` into `step(state, batch, base, *rest)`, where `model` is `adapted.bind(base, key)`: a
  Model-like handle whose `apply(adapters, ...)` runs the base with the adapters. Step files do not
  change: they differentiate their `params` (the adapters) as before.
- The reference of DPO and PPO is the same base with the adapters switched off: the plain
  `Model` on `base`. No second copy of the weights exists.
- Sampling and evaluation run the plain model on `adapted.merge(base, adapters)`.
- Checkpoints hold the adapters and a pointer to the base (meta `lora`: {config, base}); loading
  one (`jaxlm.init_source.load_params`) merges them onto the base it points at.

Sharding: adapters carry logical axes like every parameter (A: the weight's input axes +
'lora_rank'; B: 'lora_rank' + its output axes; 'lora_rank' is replicated).

Written here rather than with qwix: qwix adds adapters by intercepting the einsums of a live
NNX module while it runs, and our model's parameters are a plain dict merged into modules
inside `lax.scan` over stacked layers, with the MLP's gate and up weights stacked before their
einsum; the intercepted shapes would not be our parameters (nor peft's), and its QLoRA path
needs the same interception. The whole mechanism here is ~200 lines.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model import Adapters, Model, ModelConfig

Params = dict[str, Any]

# Target name -> (module group, parameter name, number of input axes, Hugging Face module name).
TARGETS: dict[str, tuple[str, str, int, str]] = {
    "q": ("attn", "wq", 1, "q_proj"), "k": ("attn", "wk", 1, "k_proj"), "v": ("attn", "wv", 1, "v_proj"),
    "o": ("attn", "wo", 2, "o_proj"), "gate": ("mlp", "w_gate", 1, "gate_proj"), "up": ("mlp", "w_up", 1, "up_proj"),
    "down": ("mlp", "w_down", 1, "down_proj"),
}
RANK_AXIS = "lora_rank"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Rank r, alpha α (the update is scaled by α / r), dropout on the adapters' input, targets.

    `train_embeddings`: the embedding table (and an untied output head) train in full beside the
    adapters, started from the base's (peft's `modules_to_save=["embed_tokens", "lm_head"]`): what
    a base needs to learn tokens it has never produced, e.g. a chat format's markers.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)
    train_embeddings: bool = False

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"rank must be > 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"targets {list(self.targets)}: each must be one of {list(TARGETS)} (at least one)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def from_config(block) -> LoraConfig | None:
    """The `lora` config block as a LoraConfig; None when `rank` is 0 (full fine-tuning). Errors name the flag."""
    if block is None or not block.rank:
        return None
    targets = tuple(t.strip() for t in block.targets.split(",") if t.strip())
    try:
        return LoraConfig(rank=block.rank, alpha=block.alpha, dropout=block.dropout, targets=targets,
                          train_embeddings=bool(block.get("train_embeddings", False)))
    except ValueError as e:
        raise ValueError(f"--config.lora.*: {e}") from None


def _weights(cfg: ModelConfig, lcfg: LoraConfig):
    """(target, group, name, n_in, weight shape without layers, weight's logical axes) per target."""
    shapes = jax.tree.map(lambda a: a.shape, Model(cfg).abstract_params()["blocks"])
    axes = Model(cfg).logical_axes()["blocks"]
    for target in lcfg.targets:
        group, name, n_in, _ = TARGETS[target]
        yield target, group, name, n_in, shapes[group][name][1:], axes[group][name][1:]


def _tree(cfg, lcfg, leaf: Callable) -> Params:
    tree: Params = {}
    for _, group, name, n_in, shape, axes in _weights(cfg, lcfg):
        tree.setdefault(group, {})[name] = leaf(shape[:n_in], shape[n_in:], axes[:n_in], axes[n_in:])
    return {"blocks": tree}


def init_adapters(cfg: ModelConfig, lcfg: LoraConfig, rng: jax.Array) -> Params:
    """{"blocks": {group: {name: {"a": [L, *in, r], "b": [L, r, *out]}}}}: A as peft's default
    (kaiming-uniform with a = √5: U(±1/√fan_in)), B zero, float32."""
    keys = iter(jax.random.split(rng, len(lcfg.targets)))
    r, layers = lcfg.rank, cfg.num_layers

    def leaf(shape_in, shape_out, *_):
        bound = 1.0 / math.sqrt(math.prod(shape_in))
        a = jax.random.uniform(next(keys), (layers, *shape_in, r), jnp.float32, -bound, bound)
        return {"a": a, "b": jnp.zeros((layers, r, *shape_out), jnp.float32)}
    return _tree(cfg, lcfg, leaf)


def adapter_axes(cfg: ModelConfig, lcfg: LoraConfig) -> Params:
    return _tree(cfg, lcfg, lambda _i, _o, axes_in, axes_out: {"a": ("layers", *axes_in, RANK_AXIS),
                                                              "b": ("layers", RANK_AXIS, *axes_out)})


def delta(adapter: Params, scale: float) -> jax.Array:
    """[L, *in, *out]: scale · A·B of one stacked adapter, the weight update it stands for."""
    return scale * jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(adapter["a"], adapter["b"])


def embedding_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The parameters `train_embeddings` trains in full: the table, and the output head if untied."""
    return ("embed",) if cfg.tie_embeddings else ("embed", "lm_head")


def with_trained(base: Params, params: Params) -> Params:
    """The base with the fully trained parameters of `params` (embeddings, if any) in their place."""
    return {**base, **{k: params[k].astype(base[k].dtype) for k in ("embed", "lm_head") if k in params}}


def merge(base: Params, adapters: Params, lcfg: LoraConfig) -> Params:
    """The base's params with every adapted weight replaced by W + (α/r)·A·B, and trained embeddings
    in place (a new tree; the base's dtypes)."""
    base = with_trained(base, adapters)
    blocks = {g: dict(v) for g, v in base["blocks"].items()}
    for group, named in adapters["blocks"].items():
        for name, adapter in named.items():
            w = blocks[group][name]
            blocks[group][name] = (w.astype(jnp.float32) + delta(adapter, lcfg.scale)).astype(w.dtype)
    return {**base, "blocks": blocks}


class Adapted:
    """The trainable side of a LoRA run: `params` are the adapters. Like a `Model` for the train state
    (`init`, `abstract_params`, `logical_axes`), plus `bind(base)` for the step and `merge` for sampling."""

    def __init__(self, cfg: ModelConfig, lcfg: LoraConfig):
        self.cfg, self.lora, self.base_model = cfg, lcfg, Model(cfg)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and (other.cfg, other.lora) == (self.cfg, self.lora)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.cfg, self.lora))

    def init(self, rng: jax.Array, base: Params | None = None) -> Params:
        """Fresh adapters (B = 0); with `train_embeddings`, the base's embeddings (float32) beside them."""
        if self.lora.train_embeddings and base is None:
            raise ValueError("LoRA with train_embeddings starts from the base's embeddings: pass the base")
        adapters = init_adapters(self.cfg, self.lora, rng)
        if not self.lora.train_embeddings:
            return adapters
        return {**adapters, **{k: base[k].astype(jnp.float32) for k in embedding_names(self.cfg)}}

    def abstract_params(self) -> Params:
        tree = jax.eval_shape(lambda rng: init_adapters(self.cfg, self.lora, rng), jax.random.PRNGKey(0))
        if self.lora.train_embeddings:
            model = self.base_model.abstract_params()
            tree.update({k: model[k] for k in embedding_names(self.cfg)})
        return tree

    def logical_axes(self) -> Params:
        axes = adapter_axes(self.cfg, self.lora)
        if self.lora.train_embeddings:
            model = self.base_model.logical_axes()
            axes.update({k: model[k] for k in embedding_names(self.cfg)})
        return axes

    def bind(self, base: Params, dropout_rng: jax.Array | None = None) -> "Bound":
        return Bound(self, base, dropout_rng)

    def merge(self, base: Params, adapters: Params) -> Params:
        return merge(base, adapters, self.lora)


class Bound:
    """Model-like handle inside a step: `apply(adapters, ...)` is the frozen base with the adapters.

    The base enters under `stop_gradient` (frozen by construction: no gradient is ever formed for
    it). Dropout is drawn from `dropout_rng` when given (training), never otherwise.
    """

    def __init__(self, adapted: Adapted, base: Params, dropout_rng: jax.Array | None = None):
        self.adapted, self.cfg, self.base = adapted, adapted.cfg, jax.lax.stop_gradient(base)
        self.dropout_rng = dropout_rng

    def adapters(self, params: Params) -> Adapters:
        lcfg = self.adapted.lora
        scaled = jax.tree.map(lambda ad: {"a": ad["a"], "b": ad["b"] * lcfg.scale}, params["blocks"],
                              is_leaf=lambda x: isinstance(x, dict) and "a" in x)
        return Adapters(scaled, lcfg.dropout, self.dropout_rng if lcfg.dropout > 0 else None)

    def weights(self, params: Params) -> Params:
        """The model's weights this handle runs (adapters aside): the base, with trained embeddings if any."""
        return with_trained(self.base, params)

    def head_weights(self, params: Params) -> jax.Array:
        """[D, V]: the output projection this handle runs (the base's, or the trained embeddings)."""
        return self.adapted.base_model.head_weights(self.weights(params))

    def apply(self, params: Params, tokens, positions=None, segment_ids=None, cache=None, compute_logits=True):
        return self.adapted.base_model.apply(self.weights(params), tokens, positions, segment_ids, cache,
                                             compute_logits, adapters=self.adapters(params))


# A salt folded into the step's key for the dropout masks: other users of the key (PPO's sampling)
# never see the same bits.
_DROPOUT_SALT = 0x10A


def with_frozen_base(make_step: Callable[[Any], Callable], adapted: Adapted, *, trunk: Callable | None = None,
                     training: bool = True) -> Callable:
    """`step(state, batch, base, *rest)` from a stage's `make_step(model) -> step(state, batch, *rest)`.

    `model` is `adapted.bind(base, dropout key)`, or `trunk(bound)` (e.g. a ScalarHeadModel on it).
    With `training`, dropout keys come from `fold_in(state.rng, state.step)`; an eval step
    (`training=False`: `eval(params, batch, base, *rest)`) has none.
    """
    wrap = trunk or (lambda bound: bound)
    if not training:
        return lambda params, batch, base, *rest: make_step(wrap(adapted.bind(base)))(params, batch, *rest)

    def step(state, batch, base, *rest):
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _DROPOUT_SALT)
        return make_step(wrap(adapted.bind(base, key)))(state, batch, *rest)
    return step


def meta(lcfg: LoraConfig, base: str, fingerprint: dict | None = None) -> dict:
    """The checkpoint meta of a LoRA run: its config, the base it adapts (an init_from path) and that
    base's `base_fingerprint` (compared on resume and wherever the adapters are merged onto it)."""
    return {"config": dataclasses.asdict(lcfg), "base": base,
            **({"base_fingerprint": fingerprint} if fingerprint else {})}


def base_fingerprint(base: Params, step: int | None = None) -> dict:
    """What identifies the weights a LoRA run adapts: the base checkpoint's `step` (None for a Hugging
    Face base), every weight's shape, and per weight the float32 sums of |x| and x² (one read of the
    weights, on their own shardings; both sums of positive terms, so another mesh's summation order
    moves them by far less than `same_base`'s tolerance, and retraining by far more)."""
    def sums(tree):
        return jax.tree.map(lambda x: jnp.stack([jnp.sum(jnp.abs(x.astype(jnp.float32))),
                                                 jnp.sum(jnp.square(x.astype(jnp.float32)))]), tree)
    named = {jax.tree_util.keystr(path, simple=True, separator="/"): x
             for path, x in jax.tree_util.tree_leaves_with_path(base)}
    values = jax.jit(sums)(named)
    return {"step": step, "shapes": {k: list(x.shape) for k, x in named.items()},
            "sums": {k: [float(v) for v in np.asarray(x.addressable_data(0))] for k, x in values.items()}}


def base_changes(stored: dict, current: dict, rtol: float = 1e-5) -> list[str]:
    """How the base now (`current`) differs from the one a run started on (`stored`); empty if the same."""
    out = []
    if stored.get("step") != current.get("step"):
        out.append(f"step {stored.get('step')} -> {current.get('step')}")
    if stored.get("shapes") != current.get("shapes"):
        out.append("other weight shapes")
    elif any(not np.allclose(stored["sums"][k], current["sums"][k], rtol=rtol, atol=0) for k in stored["sums"]):
        out.append("other weights")
    return out


def check_same_base(stored: dict | None, current: dict, *, run: str, base: str) -> None:
    """A ValueError naming both paths when the base of the LoRA run `run` changed since it started."""
    changes = base_changes(stored, current) if stored and current else []  # runs from before fingerprints: none
    if changes:
        raise ValueError(f"{base} changed since the LoRA run {run} started on it ({'; '.join(changes)}): its "
                         "adapters were trained on the old weights; restore that base, or start the LoRA run anew")


def config_of_meta(m: dict) -> LoraConfig:
    c = dict(m["config"])
    return LoraConfig(**{**c, "targets": tuple(c["targets"])})

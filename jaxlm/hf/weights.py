"""Hugging Face checkpoints in and out: Llama 2/3, Mistral and Qwen2 weights, sharded as they load.

Import: `load_pretrained("hf:/path/to/model")` reads a local Hugging Face model directory
(`config.json`, `model.safetensors` or shards listed in `model.safetensors.index.json`, and the
tokenizer files) into a jaxlm `ModelConfig`, a params tree and a tokenizer
(`jaxlm.hf.tokenizer.HFTokenizer`). Every parameter is created with
`jax.make_array_from_callback` directly in its target sharding (the model's logical axes +
the rules table): each device's callback reads only its own slice of the tensor from the
memory-mapped safetensors file, layer by layer for the stacked blocks, so a model larger than
one device, or than one host's share of the mesh, never has to exist in one place. No PyTorch.

Export: `save_pretrained(out_dir, cfg, params, tokenizer=...)` writes `config.json`, safetensors
shards (+ index) and the tokenizer files; `transformers` loads the directory as
`LlamaForCausalLM` (or `Qwen2ForCausalLM` when the q/k/v projections have bias) and computes
the same logits. A reward model (`{"trunk", "head"}` params of `jaxlm.reward_model`) becomes
`LlamaForSequenceClassification` with `score.weight`; HF's score layer has no bias, so the head's
bias is kept in `config.json` as `jaxlm_score_bias` (HF's logit + that bias == our score; our
import restores it). `load_pretrained(save_pretrained(x))` gives back x bit for bit (float32).

Layouts. Hugging Face `nn.Linear` weights are [out, in]; ours are [in, out] with heads split
out: q_proj [N·H, D] → wq [D, N, H], o_proj [D, N·H] → wo [N, H, D], gate/up [F, D] → [D, F],
lm_head [V, D] → [D, V]. HF Llama checkpoints already use the "rotate half" RoPE layout that
`jaxlm.model.apply_rope` implements, so q/k need no permutation (the parity tests check it).

RoPE scaling. `ModelConfig.rope_scaling` ('none', 'linear', 'llama3' for Llama 3.1+) and its
factors come from the checkpoint's `rope_scaling` / `rope_parameters`; `model.rope_frequencies`
computes the rescaled inverse frequencies.

Refused with an error naming the reason: other architectures (MoE, other norms, activations,
biases on o_proj or the MLP, partial rotary, 'dynamic'/'yarn'/'longrope' RoPE), quantized
checkpoints, and PyTorch `.bin` weights. Sliding-window attention (Mistral v0.1, Qwen2 with
`use_sliding_window`) is exact for sequences up to the window, so the model's `max_seq_len` is
capped at the window, with a warning. Left out: multi-process export (the exporter runs in one
process with the parameters in host memory) and writing LoRA adapters.

The config.json mapping and what it refuses are in `jaxlm.hf.config`; this module holds the
weight layouts, the safetensors reader and the import/export functions.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm.data.tokenizer import ROLE_MARKERS
from jaxlm.hf.config import (SCORE_BIAS_KEY, UnsupportedCheckpointError, hf_config_from_model, model_config_from_hf,
                             read_hf_config, strip_prefix)
from jaxlm.hf.tokenizer import HFTokenizer

log = logging.getLogger(__name__)

Params = dict[str, Any]
# jaxlm.data.chat's format as a Hugging Face chat template (written with jaxlm tokenizers on export).
JAXLM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


# --- Weight layouts --------------------------------------------------------------------------------
#
# Each of our parameters comes from one HF tensor (per layer for the stacked blocks) in one of
# these layouts. `_read` maps a slice of ours to the slice of theirs it needs; `_to_hf` converts
# a whole tensor back for export.

def _weight_table(cfg: model_lib.ModelConfig, prefix: str) -> dict[tuple[str, ...], tuple[str, str]]:
    """Our param path -> (HF tensor name, '{i}' = layer index; layout)."""
    layer = prefix + "layers.{i}."
    table = {
        ("embed",): (prefix + "embed_tokens.weight", "same"),
        ("final_norm", "scale"): (prefix + "norm.weight", "same"),
        ("blocks", "attn_norm", "scale"): (layer + "input_layernorm.weight", "same"),
        ("blocks", "mlp_norm", "scale"): (layer + "post_attention_layernorm.weight", "same"),
        ("blocks", "attn", "wq"): (layer + "self_attn.q_proj.weight", "heads_in"),
        ("blocks", "attn", "wk"): (layer + "self_attn.k_proj.weight", "heads_in"),
        ("blocks", "attn", "wv"): (layer + "self_attn.v_proj.weight", "heads_in"),
        ("blocks", "attn", "wo"): (layer + "self_attn.o_proj.weight", "heads_out"),
        ("blocks", "mlp", "w_gate"): (layer + "mlp.gate_proj.weight", "T"),
        ("blocks", "mlp", "w_up"): (layer + "mlp.up_proj.weight", "T"),
        ("blocks", "mlp", "w_down"): (layer + "mlp.down_proj.weight", "T"),
    }
    if cfg.qkv_bias:
        for p in "qkv":
            table[("blocks", "attn", f"{p}_bias")] = (layer + f"self_attn.{p}_proj.bias", "heads_bias")
    if not cfg.tie_embeddings:
        table[("lm_head",)] = ("lm_head.weight", "T")
    return table


def _hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if layout == "same":
        return tuple(shape)
    if layout == "T":
        return tuple(reversed(shape))
    if layout == "heads_in":  # [D, N, H] <- [N·H, D]
        return (shape[1] * shape[2], shape[0])
    if layout == "heads_out":  # [N, H, D] <- [D, N·H]
        return (shape[2], shape[0] * shape[1])
    if layout == "heads_bias":  # [N, H] <- [N·H]
        return (shape[0] * shape[1],)
    raise ValueError(layout)


def _read(get: Callable[[tuple], np.ndarray], layout: str, index: tuple[slice, ...], head: int) -> np.ndarray:
    """Our slice `index` (unit-step slices over our dims) of a tensor, reading only what it needs.

    get(hf_index) returns that slice of the HF tensor (a memory-mapped read).
    """
    if layout == "same":
        return get(index)
    if layout == "T":
        return get(index[::-1]).T
    if layout == "heads_in":
        d, n, h = index
        rows = get((slice(n.start * head, n.stop * head), d))  # [n·H, d]
        return rows.reshape(n.stop - n.start, head, -1).transpose(2, 0, 1)[:, :, h]
    if layout == "heads_out":
        n, h, d = index
        cols = get((d, slice(n.start * head, n.stop * head)))  # [d, n·H]
        return cols.reshape(-1, n.stop - n.start, head).transpose(1, 2, 0)[:, h, :]
    if layout == "heads_bias":
        n, h = index
        return get((slice(n.start * head, n.stop * head),)).reshape(n.stop - n.start, head)[:, h]
    raise ValueError(layout)


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "same":
        return x
    if layout == "T":
        return x.T
    if layout == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if layout == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    if layout == "heads_bias":
        return x.reshape(-1)
    raise ValueError(layout)


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


# --- Reading safetensors -----------------------------------------------------------------------------


def _opened(safe_open, path: str):
    """safetensors' `safe_open(path, "np")`, its errors (a truncated or damaged header) naming the file."""
    try:
        return safe_open(path, "np")
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


class SafetensorsDir:
    """The tensors of a HF model directory: one `model.safetensors`, or shards + index. Memory-mapped."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = directory
        index_file = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index_file):
            try:
                with open(index_file) as f:
                    self.weight_map = dict(json.load(f)["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index_file}: not a safetensors index ({type(e).__name__}: {e})") from None
            root = os.path.realpath(directory)
            for file in set(self.weight_map.values()):  # a shard must be a file of this directory
                real = os.path.realpath(os.path.join(directory, str(file)))
                if os.path.dirname(real) != root:
                    raise ValueError(f"{index_file}: shard {file!r} is outside the model directory {directory}; "
                                     "refusing it")
        else:
            files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
            if not files:
                bins = glob.glob(os.path.join(directory, "*.bin")) + glob.glob(os.path.join(directory, "*.pt*"))
                hint = (f" (found {os.path.basename(bins[0])}: PyTorch pickles are not read; convert them with "
                        "transformers' save_pretrained(..., safe_serialization=True))") if bins else ""
                raise FileNotFoundError(f"no safetensors weights in {directory}{hint}")
            self.weight_map = {}
            for file in files:
                with _opened(safe_open, file) as f:
                    self.weight_map.update({name: os.path.basename(file) for name in f.keys()})
        self._stack = contextlib.ExitStack()
        self._open = lambda file: self._stack.enter_context(_opened(safe_open, os.path.join(directory, file)))
        self._handles: dict[str, Any] = {}

    def _handle(self, name: str):
        file = self.weight_map.get(name)
        if file is None:
            raise KeyError(name)
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """float32 copy of tensor `name`, or of its slice `index`; only those bytes are read."""
        handle = self._handle(name)
        try:
            x = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except Exception as e:  # a truncated or damaged file: say which
            raise ValueError(f"{os.path.join(self.directory, self.weight_map[name])}: cannot read tensor {name!r} "
                             f"({type(e).__name__}: {e})") from None
        return np.ascontiguousarray(x, dtype=np.float32)

    def close(self):
        self._stack.close()
        self._handles.clear()


def _unit_slices(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"unexpected strided shard index {index}")
        out.append(slice(start, stop))
    return tuple(out)


def _target_shardings(abstract: Params, axes: Params, mesh: Mesh | None, rules):
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: device, abstract)
    return sharding.tree_shardings(mesh, axes, abstract, rules)


def _weight_prefix(names: set[str]) -> str:
    for prefix in ("model.", ""):
        if prefix + "embed_tokens.weight" in names:
            return prefix
    raise UnsupportedCheckpointError(f"no embed_tokens.weight among the tensors ({sorted(names)[:6]} ...): "
                                     "not a Llama-family checkpoint")


def load_params(path: str, cfg: model_lib.ModelConfig | None = None, mesh: Mesh | None = None,
                rules=sharding.DEFAULT_RULES, *, score_head: bool = False, shardings: Any = None) -> Params:
    """The params tree of `path`'s weights, each leaf created in its sharding on `mesh`.

    mesh=None puts everything on the first local device. `shardings` (a tree of
    jax.sharding.Sharding matching the result, e.g. a stage's `state_shardings(...).params`)
    overrides mesh/rules: a stage binary passes the very shardings its train state uses, so the
    weights are born where the step expects them. With score_head=True the tree is a
    reward model's `{"trunk": ..., "head": {"kernel", "bias"}}` read from a
    ...ForSequenceClassification checkpoint. Every tensor in the checkpoint must be used
    (a leftover, e.g. an o_proj bias, means an architecture we would silently get wrong).
    """
    path = strip_prefix(os.fspath(path))
    hf = read_hf_config(path)
    cfg = cfg or model_config_from_hf(hf)
    reader = SafetensorsDir(path)
    try:
        names = reader.names()
        prefix = _weight_prefix(names)
        table = _weight_table(cfg, prefix)
        model = model_lib.Model(cfg)
        abstract, axes = model.abstract_params(), model.logical_axes()
        flat_abstract = _flatten(abstract)
        trunk_shardings = (shardings["trunk"] if score_head else shardings) if shardings is not None else \
            _target_shardings(abstract, axes, mesh, rules)
        flat_shardings = _flatten(trunk_shardings)
        if set(flat_shardings) != set(flat_abstract):
            raise ValueError(f"shardings {sorted(flat_shardings)} do not match the model's parameters "
                             f"{sorted(flat_abstract)}")
        if set(flat_abstract) != set(table):
            raise RuntimeError(f"jaxlm.model's parameters {sorted(flat_abstract)} no longer match the HF weight "
                               f"table {sorted(table)}: update jaxlm.hf.weights._weight_table")
        used: set[str] = set()
        flat = {}
        for key, aval in flat_abstract.items():
            template, layout = table[key]
            stacked = key[0] == "blocks"
            tensor_names = [template.format(i=i) for i in range(cfg.num_layers)] if stacked else [template]
            expected = _hf_shape(layout, aval.shape[1:] if stacked else aval.shape)
            for name in tensor_names:
                if name not in names:
                    raise UnsupportedCheckpointError(f"{path}: tensor {name} is missing (needed for {'/'.join(key)})")
                if reader.shape(name) != expected:
                    raise UnsupportedCheckpointError(f"{path}: {name} has shape {reader.shape(name)}, the config "
                                                     f"implies {expected}")
            used.update(tensor_names)
            flat[key] = _make_array(reader, tensor_names, layout, stacked, aval, flat_shardings[key], cfg.head_size)
        ignorable = {n for n in names if n.endswith("rotary_emb.inv_freq")}
        if cfg.tie_embeddings:
            ignorable.add("lm_head.weight")  # Some exporters write the tied matrix twice.
        if score_head:
            used.add("score.weight")
        leftover = names - used - ignorable
        if leftover == {"score.weight"}:
            raise UnsupportedCheckpointError(f"{path} is a sequence-classification (reward) model: "
                                             "load it with jaxlm.hf.load_reward_model")
        if leftover:
            raise UnsupportedCheckpointError(f"{path} has tensors jaxlm's model has no place for: "
                                             f"{sorted(leftover)[:8]}{' ...' if len(leftover) > 8 else ''}")
        params = _unflatten(flat)
        if not score_head:
            return params
        if "score.weight" not in names or reader.shape("score.weight") != (1, cfg.d_model):
            raise UnsupportedCheckpointError(f"{path}: a reward model needs score.weight of shape (1, {cfg.d_model})")
        head = {"kernel": reader.read("score.weight")[0], "bias": np.float32(hf.get(SCORE_BIAS_KEY, 0.0))}
        head_axes = {"kernel": ("embed",), "bias": ()}
        head_sh = shardings["head"] if shardings is not None else _target_shardings(head, head_axes, mesh, rules)
        head = jax.tree.map(lambda x, s: jax.device_put(x, s), head, head_sh)
        return {"trunk": params, "head": head}
    finally:
        reader.close()


def _make_array(reader: SafetensorsDir, names: list[str], layout: str, stacked: bool, aval, target, head: int):
    """One parameter, assembled per device from slices of the HF tensors (per layer when stacked)."""

    def callback(index):
        index = _unit_slices(index, aval.shape)
        if not stacked:
            return _read(lambda i: reader.read(names[0], i), layout, index, head)
        layers, rest = index[0], index[1:]
        return np.stack([_read(lambda i, n=names[l]: reader.read(n, i), layout, rest, head)
                         for l in range(layers.start, layers.stop)])

    return jax.make_array_from_callback(aval.shape, target, callback)


def load_pretrained(path: str, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES, **overrides):
    """(ModelConfig, params, tokenizer) of a local HF model directory; `path` may start with 'hf:'.

    What stage binaries call for `--config.init_from=hf:PATH`. `overrides`: numerics fields of
    ModelConfig (see OVERRIDABLE). The tokenizer is an `HFTokenizer` (tokenizer.json or
    tokenizer.model, with the checkpoint's chat template when it has one).
    """

    path = strip_prefix(os.fspath(path))
    cfg = model_config_from_hf(read_hf_config(path), **overrides)
    tokenizer = HFTokenizer.load(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{cfg.vocab_size} embeddings")
    return cfg, load_params(path, cfg, mesh, rules), tokenizer


def load_reward_model(path: str, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES, **overrides):
    """(ModelConfig, {"trunk", "head"} params, tokenizer) of a ...ForSequenceClassification directory
    with one label (e.g. one written by save_pretrained from a jaxlm reward model)."""

    path = strip_prefix(os.fspath(path))
    hf = read_hf_config(path)
    labels = hf.get("num_labels") or len(hf.get("id2label") or {0: None})
    if labels != 1:
        raise UnsupportedCheckpointError(f"{path}: a reward model has one output; this one has {labels} labels")
    cfg = model_config_from_hf(hf, **overrides)
    return cfg, load_params(path, cfg, mesh, rules, score_head=True), HFTokenizer.load(path)


# --- Writing ---------------------------------------------------------------------------------------


def hf_tensors(cfg: model_lib.ModelConfig, params: Params, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every HF tensor, in the order transformers writes them: embeddings, layers, norm, head.

    `params` is a model's tree or a reward model's {"trunk", "head"}; arrays are fetched leaf by
    leaf (they must be addressable from this process).
    """
    trunk = params["trunk"] if "trunk" in params else params
    table = _weight_table(cfg, "model.")
    flat = _flatten(trunk)
    if set(flat) != set(table):
        raise ValueError(f"params {sorted(flat)} do not match the model config's parameters {sorted(table)}")
    host = {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}
    convert = lambda x, layout: np.ascontiguousarray(_to_hf(x, layout).astype(dtype))
    yield table[("embed",)][0], convert(host[("embed",)], "same")
    for i in range(cfg.num_layers):
        for key, (template, layout) in table.items():
            if key[0] == "blocks":
                yield template.format(i=i), convert(host[key][i], layout)
    yield table[("final_norm", "scale")][0], convert(host[("final_norm", "scale")], "same")
    if not cfg.tie_embeddings:
        yield "lm_head.weight", convert(host[("lm_head",)], "T")
    if "head" in params:
        yield "score.weight", np.asarray(jax.device_get(params["head"]["kernel"]), dtype)[None, :]


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, scale in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def save_pretrained(out_dir: str, cfg: model_lib.ModelConfig, params: Params, *, tokenizer=None,
                    model_type: str | None = None, dtype: str = "float32", max_shard_size: int | str = "5GB") -> str:
    """Write `params` as a Hugging Face model directory that transformers loads; returns out_dir.

    params: a Model's tree (→ ...ForCausalLM) or a reward model's {"trunk", "head"} (→
    ...ForSequenceClassification, see the module docstring for the bias). tokenizer: an
    HFTokenizer (its files are copied) or jaxlm's SentencePiece Tokenizer (written as
    tokenizer.model + tokenizer_config.json). Shards of at most `max_shard_size` with
    model.safetensors.index.json when there is more than one, as transformers writes them.
    """
    from safetensors.numpy import save_file

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}; choose float32 or bfloat16")
    np_dtype = np.float32 if dtype == "float32" else jax.numpy.bfloat16
    os.makedirs(out_dir, exist_ok=True)
    score_bias = float(jax.device_get(params["head"]["bias"])) if "head" in params else None
    if score_bias is not None and tokenizer is not None and tokenizer.pad_id == tokenizer.eos_id:
        log.warning("pad id == EOS id: transformers' sequence classification pools at the last non-pad token, "
                    "so it will skip a closing EOS that jaxlm's reward model reads")
    config = hf_config_from_model(cfg, model_type=model_type, tokenizer=tokenizer, score_bias=score_bias, dtype=dtype)

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in hf_tensors(cfg, params, np_dtype):
        if shards[-1] and size + array.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    for stale in glob.glob(os.path.join(out_dir, "model*.safetensors")) + glob.glob(
            os.path.join(out_dir, "model.safetensors.index.json")):
        os.remove(stale)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
            total += sum(a.nbytes for a in shard.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        write_tokenizer(out_dir, tokenizer)
    return out_dir


def write_tokenizer(out_dir: str, tokenizer) -> None:
    """Tokenizer files for `out_dir`: an HFTokenizer's own files, or a jaxlm SentencePiece model.

    A jaxlm tokenizer is written as tokenizer.model + a LlamaTokenizer config without the
    dummy-prefix space (`add_prefix_space: false`, as jaxlm trains it) and with jaxlm's chat format
    as `chat_template`, so transformers' AutoTokenizer and apply_chat_template give jaxlm's ids.
    """
    if hasattr(tokenizer, "save"):
        tokenizer.save(out_dir)
        return
    proto = getattr(tokenizer, "_proto", None)
    if proto is None:
        raise TypeError(f"cannot write tokenizer files for {tokenizer!r}")
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(proto)
    config: dict[str, Any] = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                              "clean_up_tokenization_spaces": False, "legacy": True, "add_prefix_space": False}
    special = {}
    for role in ("bos", "eos", "pad", "unk"):
        i = getattr(tokenizer, f"{role}_id")
        if i >= 0:
            config[f"{role}_token"] = special[i] = tokenizer.id_to_piece(i)
    ids = {m: tokenizer.piece_to_id(m) for m in ROLE_MARKERS}
    markers = {i: m for m, i in ids.items() if tokenizer.id_to_piece(i) == m}
    added = {**special, **markers}
    config["added_tokens_decoder"] = {str(i): {"content": c, "special": True} for i, c in added.items()}
    if len(markers) == len(ROLE_MARKERS) and tokenizer.bos_id >= 0 and tokenizer.eos_id >= 0:
        config["chat_template"] = JAXLM_CHAT_TEMPLATE
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)

"""LoRA adapters in Hugging Face peft's format: `adapter_config.json` + `adapter_model.safetensors`.

    save_adapter(out_dir, cfg, lcfg, adapters, base_model="...")   # peft's PeftModel.from_pretrained reads it
    lcfg, adapters = load_adapter(path, cfg)                          # onto a base imported from HF

peft names each adapter `base_model.model.model.layers.{i}.{self_attn|mlp}.{q_proj|...}.lora_A.weight`
([r, in], nn.Linear's [out, in] layout) and `...lora_B.weight` ([out, r]), and scales B·A by
lora_alpha / r. Ours (`jaxlm.lora`) are stacked over layers with heads split out: a [L, *in, r],
b [L, r, *out], so lora_A = a[i].reshape(in, r).T and lora_B = b[i].reshape(r, out).T (heads
flattened as the base weights are, `jaxlm.hf.weights`). Refused with a reason: rsLoRA, DoRA,
per-module ranks or alphas, biases, layer subsets, modules we do not adapt.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np

from jaxlm import lora
from jaxlm.hf.config import UnsupportedCheckpointError
from jaxlm.model import ModelConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers.{i}.{module}.{name}.lora_{ab}.weight"
_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
_MODULE = {"attn": "self_attn", "mlp": "mlp"}
_BY_HF_NAME = {hf_name: target for target, (_, _, _, hf_name) in lora.TARGETS.items()}


def _hf_key(target: str, layer: int, ab: str) -> str:
    group, _, _, hf_name = lora.TARGETS[target]
    return _PREFIX.format(i=layer, module=_MODULE[group], name=hf_name, ab=ab)


def save_adapter(out_dir: str, cfg: ModelConfig, lcfg: lora.LoraConfig, adapters, *, base_model: str = "") -> None:
    """Write `adapters` (jaxlm.lora's tree) as a peft LoRA adapter of `base_model` (a name or path)."""
    from safetensors.numpy import save_file
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for target in lcfg.targets:
        group, name, _, _ = lora.TARGETS[target]
        a, b = (np.asarray(jax.device_get(adapters["blocks"][group][name][k]), np.float32) for k in "ab")
        for i in range(cfg.num_layers):
            tensors[_hf_key(target, i, "A")] = np.ascontiguousarray(a[i].reshape(-1, lcfg.rank).T)
            tensors[_hf_key(target, i, "B")] = np.ascontiguousarray(b[i].reshape(lcfg.rank, -1).T)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
              "r": lcfg.rank, "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout,
              "target_modules": sorted(lora.TARGETS[t][3] for t in lcfg.targets), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
              "alpha_pattern": {}, "revision": None}
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def read_adapter_config(path: str) -> lora.LoraConfig:
    """The LoraConfig of a peft adapter directory; what we cannot represent is refused, naming the field."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not a peft adapter directory)")
    with open(file) as f:
        c = json.load(f)
    problems = []
    if c.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={c.get('peft_type')!r} (only LORA)")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if c.get(key):
            problems.append(f"{key}=true")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if c.get(key):
            problems.append(f"{key}={c[key]!r}")
    if c.get("bias", "none") != "none":
        problems.append(f"bias={c['bias']!r}")
    modules = c.get("target_modules") or []
    if isinstance(modules, str):
        problems.append(f"target_modules={modules!r} (a regex; list the module names)")
        modules = []
    unknown = [m for m in modules if m not in _BY_HF_NAME]
    if unknown:
        problems.append(f"target_modules {unknown} (jaxlm adapts {sorted(_BY_HF_NAME)})")
    if problems:
        raise UnsupportedCheckpointError(f"{file}: " + "; ".join(problems))
    targets = tuple(t for t in lora.TARGETS if lora.TARGETS[t][3] in modules)
    return lora.LoraConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)),
                           targets=targets)


def load_adapter(path: str, cfg: ModelConfig) -> tuple[lora.LoraConfig, dict]:
    """(LoraConfig, adapters as jaxlm.lora's tree, float32 numpy) of a peft adapter directory for a base of `cfg`."""
    from safetensors.numpy import load_file
    lcfg = read_adapter_config(path)
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} (peft's .bin adapters are not read)")
    found = {}
    for key, value in load_file(file).items():
        m = _KEY.search(key)
        if m is None or m.group(3) not in _BY_HF_NAME:
            raise UnsupportedCheckpointError(f"{file}: unexpected tensor {key}")
        found[(_BY_HF_NAME[m.group(3)], int(m.group(1)), m.group(4))] = value
    shapes = lora.Adapted(cfg, lcfg).abstract_params()["blocks"]
    blocks: dict = {}
    for target in lcfg.targets:
        group, name, _, _ = lora.TARGETS[target]
        shape_a, shape_b = shapes[group][name]["a"].shape, shapes[group][name]["b"].shape  # [L, *in, r], [L, r, *out]
        layers_a, layers_b = [], []
        for i in range(cfg.num_layers):
            a, b = found.pop((target, i, "A"), None), found.pop((target, i, "B"), None)
            if a is None or b is None:
                raise UnsupportedCheckpointError(f"{file}: no lora_A/lora_B for layer {i}'s {lora.TARGETS[target][3]}")
            try:
                layers_a.append(a.T.reshape(shape_a[1:]))
                layers_b.append(b.T.reshape(shape_b[1:]))
            except ValueError:
                raise ValueError(f"{file}: layer {i}'s {lora.TARGETS[target][3]} adapter has shapes {a.shape}, "
                                 f"{b.shape}; the base model needs {shape_a[1:]} and {shape_b[1:]}") from None
        blocks.setdefault(group, {})[name] = {"a": np.stack(layers_a).astype(np.float32),
                                              "b": np.stack(layers_b).astype(np.float32)}
    if found:
        raise UnsupportedCheckpointError(f"{file}: tensors for layers the base does not have: {sorted(found)[:4]}")
    return lcfg, {"blocks": blocks}

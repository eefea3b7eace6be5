"""Hugging Face config.json <-> jaxlm `ModelConfig`: what `jaxlm.hf` imports and exports, and what it refuses.

`model_config_from_hf(read_hf_config(path))` maps a Llama, Mistral or Qwen2 config.json (transformers
4.x or 5.x RoPE keys) to a `ModelConfig`, raising `UnsupportedCheckpointError` that names every
option jaxlm's model does not implement; `hf_config_from_model(cfg)` writes one back. No weights
here: their layouts and I/O are `jaxlm.hf.weights`'.
"""

from __future__ import annotations

import json
import logging
import os

from jaxlm import model as model_lib

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
SCORE_BIAS_KEY = "jaxlm_score_bias"
# Numerics-only ModelConfig fields a stage may set on an imported model; the rest is the checkpoint's.
OVERRIDABLE = ("dtype", "remat", "scan_unroll", "attention_impl", "logits_chunk", "attention_chunk", "max_seq_len", "init_std")
_ARCH_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


class UnsupportedCheckpointError(ValueError):
    """The checkpoint uses an architecture or option that jaxlm's model does not implement."""


def strip_prefix(path: str) -> str:
    """'hf:/x/y' -> '/x/y' (the `--config.init_from=hf:PATH` convention); other paths unchanged."""
    return path[3:] if path.startswith("hf:") else path


def read_hf_config(path: str) -> dict:
    path = strip_prefix(os.fspath(path))
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: no config.json")
    try:
        with open(file) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def rope_parameters(hf: dict) -> dict:
    """{'rope_type', 'rope_theta', ...} from a transformers 4.x (rope_theta + rope_scaling) or 5.x
    (rope_parameters) config.json."""
    params = dict(hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedCheckpointError(f"per-layer RoPE parameters are not supported: {params}")
    params.update(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return params


def model_config_from_hf(hf: dict, **overrides) -> model_lib.ModelConfig:
    """The jaxlm ModelConfig of a Hugging Face config.json (a dict); raises on what we cannot run.

    `overrides` may set the numerics fields in OVERRIDABLE (e.g. dtype='bfloat16', remat='full').
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedCheckpointError(
            f"model_type={model_type!r} (architectures {hf.get('architectures')}) is not supported; "
            f"jaxlm runs {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
    problems = []
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        problems.append(f"hidden_act={hf['hidden_act']!r} (only SiLU/SwiGLU)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=True")
    if model_type != "qwen2" and hf.get("attention_bias"):
        problems.append("attention_bias=True (bias on q/k/v and o_proj)")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        problems.append(f"quantization_config ({method}): quantized weights")
    rope = rope_parameters(hf)
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={partial}")
    if rope["rope_type"] not in ROPE_TYPES:
        problems.append(f"rope_type={rope['rope_type']!r} (supported: {', '.join(ROPE_TYPES)})")
    if problems:
        raise UnsupportedCheckpointError(f"cannot import this {model_type} checkpoint: " + "; ".join(problems))

    d, n = hf["hidden_size"], hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], d_model=d, num_heads=n,
        num_kv_heads=hf.get("num_key_value_heads") or n,
        head_dim=0 if (hf.get("head_dim") or d // n) == d // n else hf["head_dim"],  # 0: jaxlm's d_model // heads
        mlp_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope["rope_theta"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=model_type == "qwen2",
        init_std=float(hf.get("initializer_range", 0.02)))
    if rope["rope_type"] != "default":
        fields.update(rope_scaling=rope["rope_type"], rope_scaling_factor=float(rope["factor"]))
        if rope["rope_type"] == "llama3":
            fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                          rope_high_freq_factor=float(rope["high_freq_factor"]),
                          rope_original_max_len=int(rope["original_max_position_embeddings"]))
    window = _sliding_window(hf)
    if window is not None and window < fields["max_seq_len"]:
        log.warning("%s uses sliding-window attention (window %d); jaxlm attends to the whole context, which is "
                    "identical up to %d tokens: max_seq_len is capped there", model_type, window, window)
        fields["max_seq_len"] = window
    bad = set(overrides) - set(OVERRIDABLE)
    if bad:
        raise ValueError(f"cannot override {sorted(bad)} of an imported model (allowed: {', '.join(OVERRIDABLE)})")
    fields.update(overrides)
    return model_lib.ModelConfig(**fields)


def _sliding_window(hf: dict) -> int | None:
    """The window of the checkpoint's sliding-window layers, if any layer has one."""
    if hf["model_type"] == "mistral":
        return hf.get("sliding_window", 4096)  # transformers' MistralConfig default when the key is absent
    if hf["model_type"] == "qwen2" and hf.get("use_sliding_window"):
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
            for i in range(hf["num_hidden_layers"])]
        if "sliding_attention" in layer_types:
            return hf.get("sliding_window", 4096)
    return None


def hf_config_from_model(cfg: model_lib.ModelConfig, *, model_type: str | None = None, tokenizer=None,
                         score_bias: float | None = None, dtype: str = "float32") -> dict:
    """config.json for `cfg`: Llama, or Qwen2 when cfg.qkv_bias. `score_bias` set = a reward model.

    RoPE is written both the transformers 4.x way (rope_theta, rope_scaling) and the 5.x way
    (rope_parameters), so either version reads it.
    """
    model_type = model_type or ("qwen2" if cfg.qkv_bias else "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}; choose one of {SUPPORTED_MODEL_TYPES}")
    if cfg.qkv_bias != (model_type == "qwen2"):
        raise ValueError(f"qkv_bias={cfg.qkv_bias} does not fit model_type={model_type!r} (only qwen2 has q/k/v bias)")
    kind = cfg.rope_scaling
    rope_scaling = None
    if kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    elif kind == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                        "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                        "original_max_position_embeddings": cfg.rope_original_max_len}
    suffix = "ForCausalLM" if score_bias is None else "ForSequenceClassification"
    hf = {
        "architectures": [_ARCH_PREFIX[model_type] + suffix], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(rope_scaling or {})},
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "attention_dropout": 0.0, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
    }
    if model_type == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    else:
        hf.update(attention_bias=False, mlp_bias=False)
        if model_type == "mistral":
            hf["sliding_window"] = None
    if tokenizer is not None:
        for role in ("bos", "eos", "pad"):
            i = getattr(tokenizer, f"{role}_id")
            hf[f"{role}_token_id"] = int(i) if i >= 0 else None
    if score_bias is not None:
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        hf[SCORE_BIAS_KEY] = float(score_bias)
    return hf

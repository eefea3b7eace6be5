r"""Export a jaxlm run's checkpoint as a Hugging Face model directory.

    python -m tools.hf_export --checkpoint=WORKDIR --out=DIR [--step=N] [--item=params|critic] \
        [--dtype=float32|bfloat16] [--max_shard_size=5GB] [--model_type=llama|mistral|qwen2]

Writes DIR/config.json, DIR/model.safetensors (or shards + model.safetensors.index.json) and the
run's tokenizer. `transformers.AutoModelForCausalLM.from_pretrained(DIR)` then computes the same
logits as jaxlm (tests/test_hf.py checks it). A reward model's checkpoint (params {"trunk",
"head"}), or PPO's critic (--item=critic), becomes `...ForSequenceClassification` with one label;
HF's score layer has no bias, so the head's bias is written to config.json as
`jaxlm_score_bias` (our score = HF's logit + that bias). Runs on the host CPU (JAX_PLATFORMS=cpu
unless set), in one process; host memory must hold the parameters once.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Export needs no accelerator; keep parameters in host memory.

from absl import app, flags  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A jaxlm run's workdir (or its checkpoints/ dir).",
                                  required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory for the Hugging Face model.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_ITEM = flags.DEFINE_string("item", "params", "Which parameters of the saved state: params, or critic (PPO).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the written tensors.")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file, e.g. 5GB, 500MB.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", None, ["llama", "mistral", "qwen2"],
                                "HF architecture (default: qwen2 if q/k/v have bias, else llama).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import dataclasses

    from jaxlm import checkpoint, hf
    from jaxlm.hf import load_tokenizer
    from jaxlm.model import ModelConfig

    params, meta = checkpoint.load_params(_CHECKPOINT.value, _STEP.value, item=_ITEM.value)
    model_key = "critic_model" if _ITEM.value == "critic" and "critic_model" in meta else "model"
    if model_key not in meta:
        raise SystemExit(f"hf_export: {_CHECKPOINT.value} has no model config in its metadata (keys {sorted(meta)})")
    cfg = ModelConfig(**meta[model_key])
    tokenizer = load_tokenizer(meta["tokenizer"]) if meta.get("tokenizer") else None
    if tokenizer is None:
        print("hf_export: the checkpoint names no tokenizer; writing the model only", flush=True)
    hf.save_pretrained(_OUT.value, cfg, params, tokenizer=tokenizer, model_type=_MODEL_TYPE.value,
                       dtype=_DTYPE.value, max_shard_size=_MAX_SHARD.value)
    kind = "reward model" if "head" in params else "language model"
    config = hf.read_hf_config(_OUT.value)
    print(f"wrote {_OUT.value}: {config['architectures'][0]} ({kind}, stage {meta.get('stage')!r}, "
          f"{cfg.num_params() / 1e6:.2f}M parameters, {_DTYPE.value}); model config "
          f"{dataclasses.asdict(cfg)}", flush=True)


if __name__ == "__main__":
    app.run(main)

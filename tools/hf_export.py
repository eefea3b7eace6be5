r"""Export a jaxlm run's checkpoint as a Hugging Face model directory.

    python -m tools.hf_export --checkpoint=WORKDIR --out=DIR [--step=N] [--item=params|critic] \
        [--dtype=float32|bfloat16] [--max_shard_size=5GB] [--model_type=llama|mistral|qwen2] [--adapter]

Writes DIR/config.json, DIR/model.safetensors (or shards + model.safetensors.index.json) and the
run's tokenizer. `transformers.AutoModelForCausalLM.from_pretrained(DIR)` then computes the same
logits as jaxlm (tests/test_hf.py checks it). A reward model's checkpoint (params {"trunk",
"head"}), or PPO's critic (--item=critic), becomes `...ForSequenceClassification` with one label;
HF's score layer has no bias, so the head's bias is written to config.json as
`jaxlm_score_bias` (our score = HF's logit + that bias). A LoRA run (meta `lora`) is exported
merged onto its base (PPO's critic, `--item=critic`, onto the reward model's trunk it adapts), or with --adapter as the adapter alone in peft's format (DIR/adapter_config.json,
DIR/adapter_model.safetensors; `peft.PeftModel.from_pretrained(base, DIR)`). Runs on the host CPU (JAX_PLATFORMS=cpu
unless set), in one process; host memory must hold the parameters once.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Export needs no accelerator; keep parameters in host memory.

from absl import app, flags  # noqa: E402

from jaxlm import runtime  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A jaxlm run's workdir (or its checkpoints/ dir).",
                                  required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory for the Hugging Face model.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_ITEM = flags.DEFINE_string("item", "params", "Which parameters of the saved state: params, or critic (PPO).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the written tensors.")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file, e.g. 5GB, 500MB.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", None, ["llama", "mistral", "qwen2"],
                                "HF architecture (default: qwen2 if q/k/v have bias, else llama).")
_ADAPTER = flags.DEFINE_bool("adapter", False, "A LoRA run: write its adapter alone, in peft's format.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import dataclasses

    from jaxlm import checkpoint, hf, init_source, lora
    from jaxlm.hf import adapter, load_tokenizer
    from jaxlm.model import ModelConfig

    if _ADAPTER.value:
        adapters, meta = checkpoint.load_params(_CHECKPOINT.value, _STEP.value, item=_ITEM.value)
        if "lora" not in meta or _ITEM.value != "params":
            raise SystemExit(f"hf_export: --adapter needs a LoRA run's params; {_CHECKPOINT.value} has no LoRA "
                             f"adapters in {_ITEM.value!r}")
        if "trunk" in adapters:
            raise SystemExit("hf_export: --adapter writes a causal LM's adapter; a reward model's head has no "
                             "peft form here: export it merged (without --adapter)")
        lcfg = lora.config_of_meta(meta["lora"])
        if lcfg.train_embeddings:
            raise SystemExit("hf_export: this run also trained its embeddings, which a peft LoRA adapter here does "
                             "not carry: export it merged (without --adapter)")
        adapter.save_adapter(_OUT.value, ModelConfig(**meta["model"]), lcfg, adapters, base_model=hf.strip_prefix(meta["lora"]["base"]))
        print(f"wrote {_OUT.value}: peft LoRA adapter (r={lcfg.rank}, alpha={lcfg.alpha}, {','.join(lcfg.targets)}) "
              f"of {meta['lora']['base']}", flush=True)
        return
    params, meta = init_source.run_params(_CHECKPOINT.value, _STEP.value, item=_ITEM.value)  # LoRA: merged
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
    runtime.run(main)

r"""Convert a Hugging Face model directory into a jaxlm checkpoint directory.

    python -m tools.hf_import --hf=PATH --workdir=DIR

Writes DIR/checkpoints/0 with the state {"params": ...} and the usual metadata (stage
"hf_import", model config, tokenizer) plus DIR/tokenizer/ (the checkpoint's tokenizer files), so
any stage can start from DIR with `--config.init_from=DIR` exactly as from a jaxlm run, and
`jaxlm.checkpoint.load_params(DIR)` reads it. A `...ForSequenceClassification` checkpoint with one
label is imported as a reward model ({"trunk", "head"}). Stage binaries can also read the HF
directory directly (`--config.init_from=hf:PATH`, `jaxlm.hf.load_pretrained`); this tool is for
keeping a converted copy, e.g. to skip the conversion on every run. Runs on the host CPU.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

_HF = flags.DEFINE_string("hf", None, "Local Hugging Face model directory (an 'hf:' prefix is accepted).",
                          required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output jaxlm run directory.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import dataclasses

    from jaxlm import checkpoint, hf

    source = os.path.abspath(hf.strip_prefix(_HF.value))
    workdir = os.path.abspath(_WORKDIR.value)
    architectures = hf.read_hf_config(source).get("architectures") or []
    reward = any(a.endswith("ForSequenceClassification") for a in architectures)
    load = hf.load_reward_model if reward else hf.load_pretrained
    cfg, params, tokenizer = load(source)
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    tokenizer.save(tokenizer_dir)
    meta = {"stage": "hf_import", "model": dataclasses.asdict(cfg), "tokenizer": tokenizer_dir,
            "config": {"hf": source, "architectures": architectures}}
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(0, {"params": params}, meta=meta)
    ckpt.close()
    print(f"wrote {workdir}: {'reward model' if reward else 'language model'} from {source} "
          f"({cfg.num_params() / 1e6:.2f}M parameters); tokenizer in {tokenizer_dir}", flush=True)


if __name__ == "__main__":
    app.run(main)

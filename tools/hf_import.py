r"""Convert a Hugging Face model directory into a jaxlm checkpoint directory.

    python -m tools.hf_import --hf=PATH --workdir=DIR

Writes DIR/checkpoints/0 with the state {"params": ...} and the usual metadata (stage
"hf_import", model config, tokenizer) plus DIR/tokenizer/ (the checkpoint's tokenizer files), so
any stage can start from DIR with `--config.init_from=DIR` exactly as from a jaxlm run, and
`jaxlm.checkpoint.load_params(DIR)` reads it. A `...ForSequenceClassification` checkpoint with one
label is imported as a reward model ({"trunk", "head"}). Stage binaries can also read the HF
directory directly (`--config.init_from=hf:PATH`, `jaxlm.hf.load_pretrained`); this tool is for
keeping a converted copy, e.g. to skip the conversion on every run. Runs on the host CPU.

DIR must hold no run yet (a run's later checkpoints would shadow step 0); `--overwrite` moves an
existing one aside to DIR.replaced-TIME first.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from jaxlm import runtime  # noqa: E402  (also defines --overwrite)

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
    os.makedirs(workdir, exist_ok=True)
    runtime.lock_workdir(workdir)
    found = checkpoint.newest_meta(os.path.join(workdir, "checkpoints"))
    if found is not None and not flags.FLAGS["overwrite"].value:
        raise ValueError(f"--workdir={workdir} already holds a {found[1].get('stage', '?')} run (checkpoint "
                         f"{found[0]}), whose checkpoints would shadow the import; use another --workdir, or add "
                         "--overwrite to move that run aside")
    if found is not None:
        print(f"--overwrite: the run that was in {workdir} is now in {runtime.move_aside(workdir)}", flush=True)
    architectures = hf.read_hf_config(source).get("architectures") or []
    reward = any(a.endswith("ForSequenceClassification") for a in architectures)
    load = hf.load_reward_model if reward else hf.load_pretrained
    cfg, params, tokenizer = load(source)
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    tokenizer.save(tokenizer_dir)
    meta = {"stage": "hf_import", "model": dataclasses.asdict(cfg), "tokenizer": "tokenizer",
            "config": {"hf": source, "architectures": architectures}}
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(0, {"params": params}, meta=meta)
    ckpt.close()
    print(f"wrote {workdir}: {'reward model' if reward else 'language model'} from {source} "
          f"({cfg.num_params() / 1e6:.2f}M parameters); tokenizer in {tokenizer_dir}", flush=True)


if __name__ == "__main__":
    runtime.run(main)

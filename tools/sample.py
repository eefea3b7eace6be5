"""Sample completions from a checkpoint and print prompt -> completion.

    PYTHONPATH=. python -m tools.sample --checkpoint=WORKDIR --prompt="Once upon a time" --top_p=0.95
    PYTHONPATH=. python -m tools.sample --checkpoint=DIR --prompts_file=prompts.jsonl --greedy

`--prompts_file` is JSONL with a "prompt" field per line, or plain text with one prompt per
non-empty line. Prompts go through `jaxlm.sampling.generate_text` in batches of `--batch_size`
(widths bucketed to multiples of `--bucket`, so a file compiles a handful of times).
"""

from __future__ import annotations

import json

import jax
from absl import app, flags, logging

from jaxlm import init_source, runtime, sampling

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Checkpoint directory (anything jaxlm.init_source.load_for_inference reads).")
flags.DEFINE_string("prompt", None, "One prompt.")
flags.DEFINE_string("prompts_file", None, "Prompts: .jsonl with a 'prompt' field, or .txt with one per line.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (at most).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set with this much mass (1 = off).")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_bool("greedy", False, "Greedy decoding (argmax) instead of sampling.")
flags.DEFINE_integer("batch_size", 16, "Prompts per generate call.")
flags.DEFINE_integer("bucket", 16, "Prompt widths are padded to a multiple of this.")


def read_prompts(path: str) -> list[str]:
    """Prompts from a .jsonl file (field 'prompt') or a text file (one per non-empty line)."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{path}:{line_no}: expected an object with a string 'prompt' field")
                prompts.append(record["prompt"])
            else:
                prompts.append(line.rstrip("\n"))
    return prompts


def main(argv):
    del argv
    prompts = ([FLAGS.prompt] if FLAGS.prompt is not None else []) + (
        read_prompts(FLAGS.prompts_file) if FLAGS.prompts_file else [])
    if not prompts:
        raise app.UsageError("give --prompt or --prompts_file")
    if not FLAGS["verbosity"].present:  # orbax logs each array it restores at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        model, params, tokenizer = init_source.load_for_inference(FLAGS.checkpoint)
    except (ValueError, FileNotFoundError) as e:  # the message names the path: say which flag gave it
        raise runtime.flag_error(e, "checkpoint", FLAGS.checkpoint) from None
    rng = jax.random.key(FLAGS.seed)
    for start in range(0, len(prompts), FLAGS.batch_size):
        chunk = prompts[start:start + FLAGS.batch_size]
        completions = sampling.generate_text(
            model, params, tokenizer, chunk, max_new_tokens=FLAGS.max_new_tokens,
            rng=jax.random.fold_in(rng, start), temperature=FLAGS.temperature, top_k=FLAGS.top_k,
            top_p=FLAGS.top_p, greedy=FLAGS.greedy, bucket=FLAGS.bucket)
        for prompt, completion in zip(chunk, completions):
            print(f"{prompt!r} → {completion!r}", flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("checkpoint")
    runtime.run(main)

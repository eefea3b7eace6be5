"""Supervised fine-tuning of the tiny pretrained model on TinyWorld instructions, on a laptop CPU.

    python -m experiments.pretrain --workdir=/tmp/jaxlm/pretrain
    python -m experiments.sft --config=experiments/configs/sft_tiny.py --workdir=/tmp/jaxlm/sft \
        --config.init_from=/tmp/jaxlm/pretrain

Expected (measured with pretrain_tiny's checkpoint): the held-out masked loss reaches ~0.35 and
the gold judge's mean score on the 320 held-out prompts (greedy answers) rises from 0.02 for the
pretrained model, which has never seen the chat format, to ~0.54 (eval.json; samples.txt shows
answers). 240 steps (~3 epochs of 6000 demonstrations) and both judge evaluations take 108 s on
2 near-idle CPU cores. Your own data:
--config.data.train_files='sft/*.jsonl' (prompt/response or messages records)
--config.data.valid_files=... ; no judge then, only held-out loss and samples.
"""

import ml_collections

from experiments.configs import common

from jaxlm.data.tinyworld.make import DEFAULT_SIZES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.init_from = ""  # Workdir of a pretraining (or SFT) run: its weights, model config and tokenizer.
    # Used only when init_from is empty (a fresh model). vocab_size=0: the tokenizer's size rounded up to 128.
    c.model = common.model()
    c.data = ml_collections.ConfigDict(dict(
        train_files="",  # Globs, comma-separated, of SFT JSONL. Empty: TinyWorld's sft_train.jsonl.
        valid_files="",  # Held-out SFT JSONL for the eval loss. Empty with TinyWorld: sft_valid.jsonl.
        prompts_file="",  # JSONL {prompt} answered for samples.txt. Empty with TinyWorld: eval_prompts.jsonl.
        dir="",  # Where TinyWorld's files are (or are generated). Empty: WORKDIR/data.
        tinyworld=ml_collections.ConfigDict(dict(seed=0, **DEFAULT_SIZES)),  # make_all() arguments.
        prompt_field="prompt", response_field="response", messages_field="messages",
        last_turn_only=False,  # messages records: learn only the last assistant turn (earlier ones are context).
        too_long="error",  # Conversations over seq_len: 'error' (file:line), 'skip' or 'truncate' (counted).
        skip_bad_records=False,  # True: skip malformed records and report how many.
        tokenizer="",  # Fresh model only: a SentencePiece .model; empty: train one on the SFT text.
        tokenizer_vocab_size=1024,
        seq_len=160,  # Longest TinyWorld conversation is ~140 tokens.
        batch_size=24,  # Global batch (rows); split evenly over processes.
        packed=True,  # Pack several conversations per row (False: one per row, padded).
        seed=0,
    ))
    c.optim = common.optim(learning_rate=1e-3, warmup_steps=20)
    c.train = common.train(240, log_every=20, checkpoint_every=80, eval_every=80, grad_accum=1,
                           eval_batches=0,  # 0 = the whole valid set
                           samples=4)  # Prompts answered (greedy) at each eval, into samples.txt and TensorBoard.
    c.eval = ml_collections.ConfigDict(dict(
        judge=True,  # TinyWorld data: mean gold-judge score of greedy answers to the eval prompts.
        judge_init=True,  # Also score the initial model (before SFT), for comparison.
        max_prompts=0,  # Judge at most this many eval prompts (0 = all).
        max_new_tokens=48,
        batch_size=64,
    ))
    c.lora = common.lora()  # rank > 0: LoRA adapters on the frozen init_from weights (README, "LoRA")
    c.mesh = common.mesh()
    c.distributed = common.distributed()
    return c

"""A Bradley-Terry reward model on the tiny SFT model's trunk, on TinyWorld preferences, on a laptop CPU.

    python -m experiments.reward --config=experiments/configs/reward_tiny.py --workdir=/tmp/jaxlm/reward \
        --config.init_from=/tmp/jaxlm/sft

Measured (SFT checkpoint of sft_tiny, TinyWorld's perturbation pairs): 195 s on 2 near-idle CPU
cores for 250 steps (2 epochs of 4000 pairs) plus normalisation. Held-out accuracy rises from 0
(a zero head ties every pair; loss ln 2) to 0.765, against 0.869 for the labels' Bayes accuracy
(printed beside it). The gap is content: on pairs whose answers are equally correct and differ
in style only, accuracy is at the Bayes rate (0.80 vs 0.76); on pairs where one answer is wrong
(a sum, a name from the context) the ~1M-parameter trunk cannot check the answer any better than
the SFT policy can produce it (0.75 vs 0.94). A judge blind to content reaches 0.764 on the same
held-out pairs (printed beside the Bayes accuracy): the reward model is at that ceiling. The
final checkpoint's head is normalised so that rewards of the SFT policy's samples on RL prompts
have mean 0 and std 1 (meta `reward_normalization`).
Pairs labelled on the SFT model's own samples: `python -m tools.make_preferences` and
--config.data.dir=THAT_DIR. Your own data: --config.data.train_files=... --config.data.valid_files=...
"""

import ml_collections

from experiments.configs import common

from jaxlm.data.tinyworld.make import DEFAULT_SIZES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.init_from = ""  # Workdir of an SFT (or pretraining, or reward) run: the trunk, model config, tokenizer.
    # Used only when init_from is empty (a fresh trunk). vocab_size=0: the tokenizer's size rounded up to 128.
    c.model = common.model()
    c.data = ml_collections.ConfigDict(dict(
        train_files="",  # Globs of preference JSONL {prompt, chosen, rejected[, label]}. Empty: TinyWorld's.
        valid_files="",  # Held-out pairs. Empty with TinyWorld: preferences_valid.jsonl.
        dir="",  # TinyWorld-layout directory (make_all or tools.make_preferences output). Empty: WORKDIR/data.
        tinyworld=ml_collections.ConfigDict(dict(seed=0, **DEFAULT_SIZES)),  # make_all() arguments.
        prompt_field="prompt", chosen_field="chosen", rejected_field="rejected", label_field="label",
        too_long="error",  # Pairs over seq_len: 'error' (file:line), 'skip' or 'truncate' (counted).
        skip_bad_records=False,
        tokenizer="",  # Fresh trunk only: a SentencePiece .model; empty: train one on the pairs' text.
        tokenizer_vocab_size=1024,
        seq_len=128,
        batch_size=32,  # Global batch in pairs (2 sequences each).
        seed=0,
    ))
    c.loss = ml_collections.ConfigDict(dict(
        margin=0.0,  # Bradley-Terry margin m: -log σ(r_c - r_r - m).
        soft_labels=False,  # Train on the `label` field (P(chosen wins)) instead of hard 1s.
    ))
    c.optim = common.optim(learning_rate=3e-4, warmup_steps=20)
    c.train = common.train(250, log_every=25, checkpoint_every=125, eval_every=125, grad_accum=1)
    c.normalize = ml_collections.ConfigDict(dict(
        on="policy",  # 'policy': the init (SFT) model's samples on RL prompts; 'data': chosen+rejected responses.
        prompts_file="",  # JSONL {prompt}. Empty: rl_prompts.jsonl with TinyWorld, else the valid pairs' prompts.
        num_samples=256,
        temperature=1.0,  # Sample as PPO will.
        max_new_tokens=48,
        batch_size=64,
        seed=0,
    ))
    c.lora = common.lora()  # rank > 0: LoRA adapters on the frozen init_from weights (README, "LoRA")
    c.mesh = common.mesh()
    c.distributed = common.distributed()
    return c

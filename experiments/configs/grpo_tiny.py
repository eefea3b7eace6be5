"""GRPO on TinyWorld's reasoning family: the SFT model learns to think, from a verifier's reward.

    python -m experiments.pretrain --workdir=/tmp/jaxlm/pretrain
    python -m experiments.sft --workdir=/tmp/jaxlm/sft --config.init_from=/tmp/jaxlm/pretrain
    python -m experiments.grpo --config=experiments/configs/grpo_tiny.py --workdir=/tmp/jaxlm/grpo \
        --config.policy_from=/tmp/jaxlm/sft

Each iteration samples 8 completions for each of 8 reasoning prompts ("What is 3 plus 1 plus 5
plus 2?"), rewards each with the TinyWorld verifier (1: the right sum after any think block),
and takes 2 optimizer steps per rollout batch with group-relative advantages. Measured in the
default pipeline (2026-12-03, /tmp/grpo_pipe2, 2 cores shared with other jobs at load ~15: 434 s):
greedy accuracy on 128 held-out reasoning prompts (`eval_accuracy`, step 0 = the SFT model)
0.156 → 0.219 (step 20) → 0.484 (step 40), KL k1 2.3 nats per answer. Not by thinking: the SFT
model's think steps copy and add badly (right 13% of the time at T = 1, against 19% for answers in
one go), so GRPO drops the <think> block (22% of sampled answers at first, 0% from iteration 13)
and learns to add in one go; completions shrink from ~15 to ~8 tokens.
Other rewards: --config.rewards='mymodule:myfn=1.0,jaxlm.rewards:think_format=0.1'; a learned
reward model: --config.reward_model.path=REWARD_WORKDIR (or hf:PATH).
"""

import ml_collections

from experiments.configs import common

from jaxlm.data.tinyworld.make import DEFAULT_SIZES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.policy_from = ""  # SFT workdir or hf:PATH: the initial policy and the frozen reference (same weights).
    c.data = ml_collections.ConfigDict(dict(
        prompts_file="",  # JSONL with `prompt` (and whatever the rewards read). Empty: TinyWorld's reasoning_prompts.jsonl.
        eval_prompts_file="",  # Held-out prompts for eval_*. Empty: TinyWorld's eval_prompts.jsonl.
        dir="",  # Where TinyWorld's files are (or are generated). Empty: WORKDIR/data.
        tinyworld=ml_collections.ConfigDict(dict(seed=0, **DEFAULT_SIZES)),  # make_all() arguments.
        prompt_field="prompt",
        max_prompt_len=64,  # Longer prompts are skipped (and counted); fixes the prompt width.
        skip_bad_records=False,
        seed=0,  # Order of the prompts (a new permutation each epoch).
    ))
    # Reward programs, `module:function=weight` comma-separated; each is logged as reward/<function>.
    # think_format at weight 0 is logged, not rewarded: the verifier alone has to teach thinking.
    c.rewards = "jaxlm.rewards:tinyworld_verifier=1.0,jaxlm.rewards:think_format=0.0"
    c.success_threshold = 1.0  # A completion whose first reward reaches this counts as correct (accuracy, pass@G).
    c.reward_model = ml_collections.ConfigDict(dict(path="", weight=1.0))  # A jaxlm reward run or hf:PATH; "" = none.
    c.rollout = ml_collections.ConfigDict(dict(
        prompts=8,  # Prompts per iteration; each sampled group_size times.
        group_size=8,
        max_new_tokens=48,  # Reasoned answers are ~38 tokens.
        temperature=1.0,
        dynamic_sampling=True,  # DAPO: drop groups whose rewards are all equal and sample more prompts.
        max_refills=2,  # Extra sampler calls per iteration at most; then uninformative groups fill the batch.
        overlong="mask",  # Truncated completions: 'mask' (out of the loss), 'penalty' (DAPO's soft one) or 'none'.
        overlong_buffer=8,
    ))
    c.grpo = ml_collections.ConfigDict(dict(
        estimator="grpo",  # grpo | grpo_no_std | dr_grpo | rloo
        clip_low=0.2, clip_high=0.28,  # DAPO's clip-higher; equal values: PPO's symmetric clip.
        ratio_level="token",  # token | sequence (GSPO; use clip_low=3e-4, clip_high=4e-4)
        aggregation="token_mean",  # token_mean (DAPO) | sequence_mean (GRPO) | constant (Dr. GRPO)
        beta=0.04,  # k3 to the reference (0: no reference forward pass).
        epochs=1,  # Passes over each rollout batch.
        minibatch_size=32,  # Rows (completions) per optimizer step: 2 steps per iteration of 64.
        grad_accum=1,
    ))
    c.optim = common.optim(learning_rate=2e-4, warmup_steps=5)
    c.lora = common.lora()  # rank > 0: LoRA adapters on the frozen policy_from weights (README, "LoRA")
    c.train = ml_collections.ConfigDict(dict(
        iterations=40,
        seed=0, log_every=1, checkpoint_every=10, keep_checkpoints=2,
        sample_every=10, samples=4,  # Completions written to samples.jsonl every sample_every iterations.
        crash_after_step=0,  # Testing only: SIGKILL the run right after this iteration (0 = never).
        sigterm_after_step=0,  # Testing only: SIGTERM to this process after this iteration (0 = never).
    ))
    c.eval = ml_collections.ConfigDict(dict(
        every=20,  # Iterations between greedy evals; also at step 0 (the SFT model) and at the end. 0 = never.
        num_prompts=128,  # Held-out prompts (0 = all).
        families="reasoning",  # Comma-separated families of the eval file to keep.
        batch_size=64,
    ))
    c.mesh = common.mesh()
    c.distributed = common.distributed()
    return c

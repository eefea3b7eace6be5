"""The whole pipeline on TinyWorld, sized for a 2-core laptop CPU.

    python -m experiments.pipeline --workdir=runs/pipeline

Measured 2026-11-29 on 2 CPU cores (`--workdir=/tmp/pl/run11`, from scratch): 13 min 31 s wall,
810 s of stages (pretrain 173, SFT 115, preferences 37, reward 85, PPO 141, DPO 105, CAI 72,
evaluate 81; an earlier run of the same stages: 12 min 16 s). DIR/report.md (and report.html,
plots/*.png) shows one row per model — base, SFT, PPO, DPO, CAI — with the gold judge's score
of greedy and of sampled answers and its parts, the reward model's score, the KL to the SFT
model, answer length and refusal rates, each model's difference to SFT with its standard error,
and a Checks section. That run: gold (greedy) 0.034 (base) → 0.518 (SFT); PPO 0.519, DPO 0.536,
CAI 0.528; gold (sampled) SFT 0.405 → PPO 0.431 (+2.0 s.e.), DPO 0.444 (+3.9 s.e.), CAI 0.453;
PPO at 0.63 nats from SFT; CAI brings rude or harmful answers to held-out red-team prompts from
33% to 2%. The reward model (held-out accuracy 0.56 against a Bayes accuracy of 0.79 and 0.58
for a judge blind to content: it ranks style and refusals but cannot check answers;
tools.reward_breakdown) caps PPO's gains.

GRPO stage (2026-12-03, with the reasoning family, on 2 cores shared at load ~15: 434 s): greedy
accuracy on 128 held-out reasoning prompts SFT 0.156 → GRPO 0.484 (paired +0.328 ± 0.054, 6.0
s.e.), gold on the 192 prompts of the other families −0.014 ± 0.020; answers stay ~8 tokens and
never think (the SFT model's think steps are worse than its one-go answers, so GRPO drops them).

Each stage is its own resumable run in DIR/<stage>/, started as a subprocess with its own config
file plus the flags below; rerunning the command skips finished stages and resumes the one that
was interrupted. Scale a stage with e.g. --config.pretrain.flags="--config.train.steps=2000".
"""

import ml_collections


def _stage(config: str, flags: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(config=config, flags=flags))


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # CPU only: each stage's subprocess sees the host as this many JAX devices and splits every batch
    # over them (one per core: ~9% faster pretraining on 2 cores than one 2-thread device). 0 or 1: one device.
    c.cpu_devices = 2
    c.stages = "data,tokenizer,pretrain,sft,grpo,preferences,reward,ppo,dpo,cai,evaluate"  # Run in this order.
    # TinyWorld sizes (jaxlm.data.tinyworld.make_all keyword arguments).
    c.data = ml_collections.ConfigDict(dict(corpus_train=20_000, corpus_valid=400, sft_train=6000, sft_valid=300,
                                            eval_per_family=24, preferences_train=2000, preferences_valid=300,
                                            rl_prompts=2000, redteam_prompts=200,
                                            # The reasoning family: 128 held-out prompts (paired differences
                                            # of greedy accuracy to ~0.05 s.e.), 1000 training-side for GRPO.
                                            eval_reasoning=128, reasoning_prompts=1000))
    c.tokenizer_vocab_size = 1024
    c.pretrain = _stage("experiments/configs/pretrain_tiny.py", "--config.train.steps=420 --config.train.samples=0")
    c.sft = _stage("experiments/configs/sft_tiny.py", "")
    # GRPO on the reasoning family from the SFT model: 8 prompts × 8 completions per iteration, the verifier's reward.
    c.grpo = _stage("experiments/configs/grpo_tiny.py", "--config.train.iterations=40 --config.eval.every=20")
    # Preference pairs: sampled from the SFT model and labelled by the gold judge with Bradley-Terry
    # noise ('sft_samples'), TinyWorld's ready-made pairs ('tinyworld'), or both for training with the
    # sampled ones held out ('sft_samples+tinyworld'). flags: more tools.make_preferences flags.
    c.preferences = ml_collections.ConfigDict(dict(source="sft_samples+tinyworld", train_prompts=1200,
                                                   valid_prompts=300, num_samples=4, pairs_per_prompt=2,
                                                   temperature=1.0, flags=""))
    # Held-out RM accuracy stops rising after ~75 steps on these pairs (tools.reward_breakdown).
    c.reward = _stage("experiments/configs/reward_tiny.py", "--config.train.steps=80 --config.train.eval_every=40 "
                      "--config.train.checkpoint_every=40")
    # 40 iterations at β ≈ 0.05 move the policy about 0.5 nats from SFT, where ppo_tiny's adaptive KL controller
    # aims (at 1 nat the reward model's errors start to cost gold score: BUILD_NOTES.md, session 7).
    c.ppo = _stage("experiments/configs/ppo_tiny.py", "--config.train.iterations=40 "
                   "--config.eval.every=20 --config.train.checkpoint_every=20 --config.train.sample_every=20")
    # beta=0.5 rather than the DPO paper's 0.1: on these pairs 0.1 drifts ~2 nats from SFT in 80 steps and
    # loses gold score; 0.5 stays within ~0.5 nats (measured in BUILD_NOTES.md, session 3).
    c.dpo = _stage("experiments/configs/dpo_tiny.py", "--config.train.steps=80 --config.eval.every=0 "
                   "--config.train.checkpoint_every=40 --config.loss.beta=0.5")
    c.dpo.pairs = "tinyworld"  # 'preferences': the reward model's pairs (DIR/preferences); 'tinyworld': ready-made.
    c.cai = _stage("experiments/configs/cai_tiny.py", "")
    # Training-side harmful requests added to the red-team prompts CAI critiques and revises (0: red-team
    # only). With 200: refusals of held-out harmful requests 0.83 -> 1.00, rude/harmful answers to held-out
    # red-team prompts 0.16 -> 0.02 (BUILD_NOTES.md, session 3).
    c.cai.harmful_prompts = 200
    # The final evaluation: every model answers the same held-out prompts greedily and num_samples
    # times at temperature 1 (gold score of both; KL to SFT on the samples), scored by the gold judge
    # and the reward model.
    c.evaluate = ml_collections.ConfigDict(dict(max_prompts=0, max_new_tokens=48, batch_size=64, num_samples=4,
                                                redteam_prompts=64, examples=6))
    return c

r"""Constitutional AI on the tiny SFT model and TinyWorld's red-team prompts, on a laptop CPU.

    python -m experiments.pretrain --workdir=/tmp/jaxlm/pretrain
    python -m experiments.sft --workdir=/tmp/jaxlm/sft --config.init_from=/tmp/jaxlm/pretrain
    python -m experiments.cai --config=experiments/configs/cai_tiny.py --workdir=/tmp/jaxlm/cai \
        --config.init_from=/tmp/jaxlm/sft                                   # phase sl
    python -m experiments.cai --workdir=/tmp/jaxlm/cai_rl --config.init_from=/tmp/jaxlm/sft \
        --config.phase=rl_label                                           # AI preference labels

Expected (phase sl): about 4 minutes on 2 idle CPU cores (10 on a shared machine): answers,
critiques and revisions for 400 red-team prompts (revisions.jsonl), 100 fine-tuning steps on the
revisions mixed half and half with original SFT data (sl_train.jsonl), and greedy answers to
held-out prompts judged before and after (eval.json). Measured on 40 held-out red-team prompts:
rude-or-harmful answers 0.475 → 0.100 (red-team gold 0.51 → 0.89), while the gold score on the
other tasks went 0.558 → 0.607 (not down). The tiny model's critiques are mostly noise (it was never
taught them); its `harmless` revisions are good, its `polite` ones often are not (revisions.jsonl).
Phase rl_label: about a minute for 200 prompts × 2 answers labelled in both orders
(ai_labels.jsonl, ai_preferences_{train,valid}.jsonl); measured with the SFT model as feedback
model: the AI's preference agrees with the gold judge on 69% of pairs, labels are soft (mean
confidence 0.52) and position-biased before averaging (P(A) = 0.40 averaged over both orders).
Your own data: --config.data.prompts_file, --config.data.sft_file, --config.data.constitution_file
(JSON {"principles": [{name, critique, revision, choice}]}) and --config.data.eval_prompts_file.
"""

import ml_collections

from experiments.configs import common

from jaxlm.data.tinyworld.make import DEFAULT_SIZES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.phase = "sl"  # 'sl': critique → revision → SFT; 'rl_label': AI preference labels for reward/PPO/DPO.
    c.init_from = ""  # SFT workdir: answers, critiques and revises (sl), or samples the pairs (rl_label).
    c.feedback_from = ""  # rl_label: the model whose choice log-probs label the pairs. Empty: init_from.
    c.data = ml_collections.ConfigDict(dict(
        dir="",  # Where TinyWorld's files are (or are generated). Empty: WORKDIR/data.
        tinyworld=ml_collections.ConfigDict(dict(seed=0, **DEFAULT_SIZES)),  # make_all() arguments.
        prompts_file="",  # JSONL {prompt}. Empty: redteam_prompts.jsonl (sl) or rl.prompts (rl_label).
        sft_file="",  # SFT JSONL mixed into the fine-tuning data. Empty: sft_train.jsonl.
        constitution_file="",  # Empty: TinyWorld's constitution.json.
        eval_prompts_file="",  # JSONL {prompt, family}; set: no gold judge. Empty: TinyWorld's eval prompts.
    ))
    c.sl = ml_collections.ConfigDict(dict(
        principles="harmless,polite",  # Constitution principles drawn from (comma-separated; empty: all).
        rounds=1,  # Critique-revision rounds; each revises the previous round's revision.
        critique=True,  # Generate (and record) a critique each round.
        revise_with_critique=False,  # Put the critique in the revision conversation (the paper's form). The tiny
        # model was never taught critiques, so its critiques are noise; it was taught the revision prompt alone.
        few_shot=0,  # Worked revisions (TinyWorld) put before each request as earlier turns.
        num_prompts=0,  # Red-team prompts used (0 = all).
        answer_temperature=1.0,  # Initial answers are sampled: the harmful ones are what there is to revise.
        revision_temperature=0.0,  # 0 = greedy critiques and revisions.
        max_new_tokens=48,
        batch_size=64,
        seed=0,
        show=3,  # Examples printed to the log.
    ))
    c.mix = ml_collections.ConfigDict(dict(
        sft_share=0.5,  # Share of the fine-tuning examples drawn from the original SFT data (keeps harmless skills).
        seed=0,
    ))
    c.optim = common.optim(learning_rate=3e-4, warmup_steps=10)
    c.train = common.train(100, log_every=10, checkpoint_every=50, batch_size=24, seq_len=160)
    c.rl = ml_collections.ConfigDict(dict(
        prompts="redteam_prompts.jsonl",  # TinyWorld file answered twice per prompt (rl_prompts.jsonl: all tasks).
        principles="harmless,polite",  # Principles drawn per pair (empty: all); these two judge red-team answers.
        num_prompts=0,  # 0 = all.
        temperature=1.0,
        max_new_tokens=48,
        batch_size=64,  # Generation batch.
        label_batch_size=32,  # Rows per feedback forward pass (4 per pair: 2 orders × 2 options).
        valid_share=0.1,  # Pairs held out in ai_preferences_valid.jsonl.
        seed=0,
    ))
    c.eval = ml_collections.ConfigDict(dict(
        enabled=True,  # Judge greedy answers to held-out prompts before and after (TinyWorld).
        families="arithmetic,context,list,harmful,harmless,redteam",
        redteam_family="redteam",
        max_new_tokens=48,
        batch_size=64,
    ))
    c.lora = common.lora()  # rank > 0: LoRA adapters on the frozen init_from weights (README, "LoRA")
    c.mesh = common.mesh()
    c.distributed = common.distributed()
    return c

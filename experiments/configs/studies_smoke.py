"""Every study at toy sizes, on the smoke pipeline: checks that the studies run and write their plots
and sentences (tests/test_studies.py), not results.

    python -m experiments.studies --workdir=/tmp/studies_smoke --config=experiments/configs/studies_smoke.py

Runs pipeline_smoke.py's stages data..dpo into DIR/pipeline first (or give --pipeline_dir).
"""

import ml_collections

from experiments.configs import studies_tiny

_SHORT = "--config.train.steps={0} --config.train.checkpoint_every={0} --config.train.eval_every={0}"


def get_config() -> ml_collections.ConfigDict:
    c = studies_tiny.get_config()
    c.pipeline.config = "experiments/configs/pipeline_smoke.py"
    c.last = 2
    c.eval = ml_collections.ConfigDict(dict(max_prompts=8, num_samples=1, max_new_tokens=8, batch_size=8))
    c.dpo.betas, c.dpo.main_beta = "0.5", 0.5
    c.dpo.flags = "--config.train.steps=2 --config.train.checkpoint_every=2"
    c.facts.repeats = 1
    c.facts.pretrain_flags = _SHORT.format(20)
    c.facts.sft_flags = _SHORT.format(4) + " --config.train.samples=0"
    c.scale.sizes = {"pipeline": ""}
    c.scale.steps = "20,pipeline"
    c.scale.num_items = 16
    c.reward.inits = "pipeline:20;pipeline:pipeline"
    c.reward.flags = "--config.train.steps=2 --config.train.eval_every=2 --config.train.checkpoint_every=2"
    return c

"""A finished run's own configuration (its config.json), to run the same stage again with a change.

    python -m experiments.ppo --config=experiments/configs/from_run.py:PIPELINE/ppo/config.json \
        --workdir=DIR --config.kl.adaptive=False --config.kl.init_coef=0

Expected: the stage as the pipeline ran it (same data, model, schedule, starting runs), changed
only by the flags given. `experiments.studies` starts every run this way, so a study's runs
differ from the pipeline's in exactly what the study varies.
"""

import json

import ml_collections


def get_config(path: str) -> ml_collections.ConfigDict:
    if not path:
        raise ValueError("experiments/configs/from_run.py needs a run's config.json: --config=from_run.py:PATH")
    with open(path) as f:
        values = json.load(f)
    for written_beside_the_config in ("stage", "devices"):  # by jaxlm.loop.write_config
        values.pop(written_beside_the_config, None)
    return ml_collections.ConfigDict(values)

"""Write the TinyWorld data set: corpus, SFT, eval, preference, RL and red-team files.

    python -m tools.make_tinyworld --out=/tmp/tinyworld
    python -m tools.make_tinyworld --out=/tmp/tw --seed=1 --flaw_share=0.4 --temperature=0.1 \\
        --corpus_train=20000 --sft_train=10000

Takes a few seconds with the default sizes; see jaxlm/data/tinyworld/make.py for the files.
"""

from absl import app
from absl import flags

from jaxlm.data.tinyworld import make
from jaxlm.data.tinyworld import preferences

_OUT = flags.DEFINE_string("out", None, "Directory to write the files to.", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the world and of every generator.")
_FLAW_SHARE = flags.DEFINE_float("flaw_share", 0.25, "Share of SFT demonstrations with a flaw.")
_TEMPERATURE = flags.DEFINE_float("temperature", preferences.DEFAULT_TEMPERATURE,
                                  "Bradley-Terry temperature of the simulated raters.")
_SFT_FAMILIES = flags.DEFINE_list("sft_families", None,
                                  "SFT families to keep (default: all of them).")
_SIZES = {k: flags.DEFINE_integer(k, v, f"Number of records: {k}.")
          for k, v in make.DEFAULT_SIZES.items()}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    make.make_all(_OUT.value, seed=_SEED.value, flaw_share=_FLAW_SHARE.value,
                  temperature=_TEMPERATURE.value,
                  sft_families=tuple(_SFT_FAMILIES.value) if _SFT_FAMILIES.value else None,
                  **{k: f.value for k, f in _SIZES.items()})


if __name__ == "__main__":
    app.run(main)

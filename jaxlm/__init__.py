"""jaxlm: a JAX/Flax stack for the whole life of a language model.

Pre-training, SFT, reward modelling, RLHF with PPO, DPO and Constitutional AI in one codebase.
See README.md for the public functional API.
"""

__version__ = "0.1.0"

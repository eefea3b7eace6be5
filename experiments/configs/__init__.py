"""Experiment configs as code: each module has get_config() -> ml_collections.ConfigDict."""

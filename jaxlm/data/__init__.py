"""Tokenizers, data sources, packing, chat template, grain pipelines and TinyWorld."""

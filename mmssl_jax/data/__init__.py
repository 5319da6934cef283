"""Data layer: formats, validation, synthetic default data, BPR sampler."""

from mmssl_jax.data.dataset import DataError, Dataset, Split, print_error

__all__ = ["DataError", "Dataset", "Split", "print_error"]

"""mmssl_jax: MMSSL (multi-modal self-supervised recommendation) in JAX/Flax."""

__version__ = "0.1.0"

"""Install mmssl_jax: `pip install -e .[test]`."""
import setuptools

setuptools.setup(
    name="mmssl_jax",
    version="0.1.0",
    description="JAX/Flax implementation of MMSSL (Wei et al., WWW 2023): "
    "multi-modal self-supervised recommendation, reference and paper variants.",
    packages=setuptools.find_packages(include=["mmssl_jax", "mmssl_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "jaxlib>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "chex>=0.1.88",
        "jraph>=0.0.6.dev0",
        "numpy>=1.26",
        "scipy>=1.11",  # unpickling scipy matrices (trnMat.pkl) and building graphs
        "absl-py>=2.1",
        "ml-collections>=0.1.1",
        "orbax-checkpoint>=0.6",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "matplotlib>=3.7", "tensorboardX>=2.6"],
        "plot": ["matplotlib>=3.7"],  # python -m mmssl_jax.plot
        "tensorboard": ["tensorboardX>=2.6"],  # progress.MetricWriter
        # Accelerators, through JAX's own extras: NVIDIA GPUs with the CUDA 12
        # wheels (older drivers too) or CUDA 13 (needs a recent driver), and
        # Cloud TPU VMs.
        "cuda": ["jax[cuda12]"],
        "cuda13": ["jax[cuda13]"],
        "tpu": ["jax[tpu]"],
    },
)

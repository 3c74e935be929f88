"""isic_jax: a JAX/Flax trainer for skin-cancer detection on ISIC dermoscopy images."""

__version__ = "0.1.0"

"""TFDS dataset builders of isic_jax.

Import `isic_jax.datasets.isic` to register the `isic` builder with TFDS.
"""

"""Keras model builders, losses and the conditional-GAN train step (no I/O here)."""

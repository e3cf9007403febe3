"""PyTorch reference path (diffusers modules); needs the `reference` extra."""

"""LoRA training on the Mac (ideo4-mlx train-lora)."""

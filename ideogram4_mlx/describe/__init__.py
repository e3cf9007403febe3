"""Describe: image -> text with the checkpoint's Qwen3-VL (``model.py``; needs the ``describe`` extra)."""

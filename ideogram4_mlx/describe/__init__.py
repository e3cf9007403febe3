"""Describe: image -> text with the checkpoint's Qwen3-VL (``model.py``, which needs the
``describe`` extra; ``vision.py`` does not)."""

"""Describe: an image -> an Ideogram 4 JSON caption, with the checkpoint's own Qwen3-VL
(``model.py``, which needs the ``describe`` extra; ``vision.py`` and ``describe.py`` do not)."""

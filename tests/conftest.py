"""Shared fixtures. Slow tests are opt-in: ``pytest --run-slow`` or ``IDEO4_RUN_SLOW=1``."""

import os

import mlx.core as mx
import pytest
from transformers import AutoTokenizer

from ideogram4_mlx.text_encoder import Qwen3VLTextEncoder


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("IDEO4_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: opt in with --run-slow or IDEO4_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A whole synthetic snapshot in the real fp8 layout, tiny sizes (written once per session)."""
    from ideogram4_mlx.synth import write_synthetic_checkpoint

    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def magic_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint (linked) plus a synthetic ``prompt_enhancer_head/``."""
    from ideogram4_mlx.synth import COMPONENTS, write_synthetic_checkpoint

    root = tmp_path_factory.mktemp("magic") / "tiny"
    write_synthetic_checkpoint(root, "tiny", components=("prompt_enhancer_head",))
    for folder in COMPONENTS:
        (root / folder).symlink_to(tiny_checkpoint / folder, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    """The tiny checkpoint's tokenizer through transformers (the reference's way to load it)."""
    return AutoTokenizer.from_pretrained(str(tiny_checkpoint / "tokenizer"))


@pytest.fixture(scope="module")
def model32(tiny_checkpoint):
    """The tiny text encoder in fp32."""
    return Qwen3VLTextEncoder.from_pretrained(tiny_checkpoint / "text_encoder", dtype=mx.float32)


@pytest.fixture(scope="module")
def rapid():
    """RapidOCR, or a skip (a failure under IDEO4_REQUIRE_OCR=1: tests/ocr_helpers.py)."""
    from ocr_helpers import require_engine

    return require_engine("rapidocr")


@pytest.fixture(scope="module")
def tess():
    """Tesseract, as ``rapid``."""
    from ocr_helpers import require_engine

    return require_engine("tesseract")

"""The compute dtype table: names, aliases, and an unknown name's message."""

import mlx.core as mx
import pytest

from ideogram4_mlx.dtypes import dtype_name, parse_dtype


def test_dtype_names_and_aliases():
    assert parse_dtype("bf16") is parse_dtype("bfloat16") == mx.bfloat16
    assert parse_dtype("fp32") == mx.float32 and dtype_name(mx.float16) == "float16"
    with pytest.raises(ValueError, match="unknown dtype 'int8'; valid: bfloat16"):
        parse_dtype("int8")

"""The compute dtype table: names, aliases, and an unknown name's message; the finiteness check."""

import mlx.core as mx
import numpy as np
import pytest

from ideogram4_mlx import dtypes
from ideogram4_mlx.dtypes import all_finite, dtype_name, parse_dtype


def test_dtype_names_and_aliases():
    assert parse_dtype("bf16") is parse_dtype("bfloat16") == mx.bfloat16
    assert parse_dtype("fp32") == mx.float32 and dtype_name(mx.float16) == "float16"
    with pytest.raises(ValueError, match="unknown dtype 'int8'; valid: bfloat16"):
        parse_dtype("int8")


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_all_finite_reads_every_non_finite_value_in_every_chunk(dtype, monkeypatch):
    monkeypatch.setattr(dtypes, "FINITE_CHUNK", 7)  # several chunks, the last one short
    edge = {mx.bfloat16: 3.3895e38, mx.float16: 65504.0, mx.float32: 3.4028235e38}[dtype]
    ok = mx.array([0.0, -0.0, 1e-40, -edge, edge, 5e-8, -1.0] * 3 + [2.0, 3.0], dtype)
    assert all_finite(ok) and all_finite(mx.zeros((0,), dtype))
    for bad in (float("nan"), float("inf"), -float("inf"), -float("nan")):
        for at in (0, 6, 7, ok.size - 1):  # first, chunk end, chunk start, last
            values = np.array(ok.astype(mx.float32))
            values[at] = bad
            assert not all_finite(mx.array(values).astype(dtype).reshape(1, -1)), (bad, at)
    assert all_finite(mx.array([1, 2], mx.int32)) and all_finite(mx.array([3], mx.uint8))

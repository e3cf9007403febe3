"""GGUF DiT files (ideogram4_mlx/sources/gguf_file.py, MODEL_NOTES#gguf-dit-files).

The reference is the `gguf` package (llama.cpp's own Python reader): every tensor ``load``
returns equals ``gguf.quants.dequantize`` of its bytes bit for bit, and every ``exact`` triple
dequantizes (``mx.dequantize``) to the same numbers (the same bits, but for the sign of a zero
in a block with a negative scale). Inputs are random blocks (every fp16 field finite and of
either sign, every code value occurring) and synthetic DiTs written the way
stable-diffusion.cpp converts the fp8 release (ideogram4_mlx/synth/gguf.py).
"""

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML
from mlx.utils import tree_flatten

from ideogram4_mlx import dtypes
from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.sources import block_groups, gguf_file
from ideogram4_mlx.sources.gguf_file import GGUFSource, is_gguf
from ideogram4_mlx.synth import gguf as synth_gguf
from ideogram4_mlx.synth import write_synthetic_checkpoint
from ideogram4_mlx.synth.gguf import TYPES, bf16_tensors, write_gguf_dit
from ideogram4_mlx.transformer import Ideogram4Transformer
from ideogram4_mlx.weights import dequantize_fp8, load_strict

MARKER = gguf_file.MARKER
EXACT_TYPES = set(gguf_file.UNPACKERS)


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf") / "tiny"
    return write_synthetic_checkpoint(root, "tiny", components=("transformer",)) / "transformer"


def write(path, tensors, arch="ideogram", meta=()):
    """A GGUF with ``tensors`` ({name: (array, ggml type or None)}) and the DiT's marker."""
    writer = gguf.GGUFWriter(path, arch=arch)
    for key, value in meta:
        writer.add_string(key, value)
    tensors = {MARKER: (np.ones((2, 64), np.float32), None), **tensors}
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_blocks(rng, qtype, rows, cols):
    """Random bytes of a (rows, cols) tensor of ``qtype``: 0..59 or 128..187, so every fp16
    field is finite and of either sign, E8M0 scales are not NaN, and codes, grids and
    sub-scales take every value."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    shape = (rows, cols // block * size)
    low = rng.integers(0, 60, shape, dtype=np.uint8)
    return low | (rng.integers(0, 2, shape, dtype=np.uint8) << 7)


def bits_equal(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def same_numbers(a, b) -> bool:
    """Equal values, and equal bits but for the sign of zero: gguf decodes a zero code of a
    block with a negative scale as d * 0 = -0, MLX's scale * q + bias gives +0."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a, b) and bits_equal(a[b != 0], b[b != 0])


def one_line_error(match, make):
    with pytest.raises(CheckpointError, match=match) as info:
        make()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_load_equals_gguf_dequantize_for_every_type(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_file, "CHUNK_ELEMENTS", 1024)  # several row chunks per tensor
    rng = np.random.default_rng(0)
    raw = {f"q.{t.name}.weight": (random_blocks(rng, t, 24, 512), t) for t in gguf_file.QUANTIZED}
    raw["norm.weight"] = (random_blocks(rng, GGML.Q8_0, 1, 256)[0], GGML.Q8_0)  # 1-D, quantized
    floats = rng.standard_normal((6, 96)).astype(np.float32)
    raw["f32.weight"] = (floats, GGML.F32)
    raw["f16.weight"] = (floats.astype(np.float16), GGML.F16)
    raw["bf16.weight"] = (gguf.quants.quantize(floats, GGML.BF16), GGML.BF16)
    source = GGUFSource(write(tmp_path / "all.gguf", raw))
    assert len(gguf_file.QUANTIZED) >= 20  # Q8_0, Q4_0, Q4_K, Q6_K ... as the package has them
    headers, qtypes = source.headers(), source.qtypes()
    for key, (data, qtype) in raw.items():
        got = source.load([key])[key]
        reference = gguf.quants.dequantize(data, qtype)
        assert bits_equal(got.astype(mx.float32), reference), key
        assert headers[key][1] == reference.shape and qtypes[key] == qtype.name
    assert headers["q.Q4_K.weight"] == ("F32", (24, 512), source.path)
    assert headers["norm.weight"][:2] == ("F32", (256,))
    assert (
        headers["bf16.weight"][0] == "BF16"
        and source.load(["bf16.weight"])["bf16.weight"].dtype == mx.bfloat16
    )
    assert headers["f16.weight"][0] == "F16" and headers["f32.weight"][0] == "F32"
    assert qtypes["q.Q6_K.weight"] == "Q6_K" and qtypes["bf16.weight"] == "BF16"


def test_exact_triples_dequantize_to_the_gguf_values(tmp_path):
    rng = np.random.default_rng(1)
    raw = {f"q.{t.name}.weight": (random_blocks(rng, t, 16, 512), t) for t in gguf_file.QUANTIZED}
    raw["norm.weight"] = (random_blocks(rng, GGML.Q8_0, 1, 256)[0], GGML.Q8_0)
    source = GGUFSource(write(tmp_path / "exact.gguf", raw))
    x = mx.array(rng.standard_normal((3, 512)).astype(np.float32))
    for key, (data, qtype) in raw.items():
        triple = source.exact(key)
        if qtype not in EXACT_TYPES or data.ndim == 1:
            assert triple is None, key  # Q6_K, Q3_K, Q2_K: groups of 16; IQ: codebooks
            continue
        assert triple["group_size"] == 32 and triple["weight"].dtype == mx.uint32
        layer = (triple["weight"], triple["scales"], triple.get("biases"))
        how = {"group_size": 32, "bits": triple["bits"], "mode": triple["mode"]}
        w = mx.dequantize(*layer, **how, dtype=mx.float32)
        reference = gguf.quants.dequantize(data, qtype)
        assert same_numbers(w, reference), key
        # and it runs as a quantized layer: the matmul agrees with the dequantized weights
        y = mx.quantized_matmul(x, *layer, **how)
        np.testing.assert_allclose(np.array(y), np.array(x) @ reference.T, rtol=1e-4, atol=1e-3)
        if qtype in (GGML.Q8_0, GGML.Q4_0, GGML.Q4_1, GGML.Q5_0, GGML.Q5_1):
            # one fp16 scale per block: scales and biases are float16 values (Q4_K/Q5_K's
            # d * sc products need float32; MODEL_NOTES#gguf-dit-files)
            for name in ("scales", "biases"):
                a = np.array(triple[name])
                assert np.array_equal(a.astype(np.float16).astype(np.float32), a)
    q4k = np.array(source.exact("q.Q4_K.weight")["scales"])
    assert not np.array_equal(q4k.astype(np.float16).astype(np.float32), q4k)


def test_exact_agrees_with_mlx_own_gguf_loader(tmp_path):
    """MLX's ``mx.load`` reads Q8_0/Q4_0/Q4_1 as affine triples (float16 scales): the same
    packed codes as ``exact``, and the same scales and biases."""
    rng = np.random.default_rng(2)
    types = (GGML.Q8_0, GGML.Q4_0, GGML.Q4_1)
    raw = {f"q{t.name}.weight": (random_blocks(rng, t, 8, 256), t) for t in types}
    path = write(tmp_path / "mlx.gguf", raw)
    theirs = mx.load(str(path))
    source = GGUFSource(path)
    for key in raw:
        ours, stem = source.exact(key), key.removesuffix(".weight")
        assert np.array_equal(np.array(ours["weight"]), np.array(theirs[key]))
        for name in ("scales", "biases"):
            assert np.array_equal(np.array(ours[name]), np.array(theirs[f"{stem}.{name}"]))


@pytest.mark.parametrize(
    "qtype, recipe, prefix, arch",
    [
        ("Q8_0", "type", "", None),
        ("Q4_0", "rules", "model.diffusion_model.", None),
        ("Q4_K", "type", "model.diffusion_model.", "ideogram"),
        ("Q6_K", "rules", "", None),
        ("F16", "type", "", None),
        ("BF16", "type", "", "ideogram"),
    ],
)
def test_synthetic_gguf_holds_exactly_the_dit_parameters(
    dit_folder, tmp_path, qtype, recipe, prefix, arch
):
    path = write_gguf_dit(
        dit_folder, tmp_path / "dit.gguf", qtype, recipe=recipe, prefix=prefix, architecture=arch
    )
    source = GGUFSource(path)
    assert is_gguf(path) and source.architecture == arch
    headers = source.headers()
    assert not any(k.startswith("model.") for k in headers)
    # the hook's entry: config.json checked against the GGUF's headers, then a strict load
    model = Ideogram4Transformer.build(dit_folder, headers)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    weights = {}
    for keys in block_groups(headers):  # one block at a time, as the converter reads
        weights.update(source.load(keys))
    weights = model.sanitize(weights)
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    assert {k: tuple(v[1]) for k, v in model.sanitize(headers).items()} == expected
    load_strict(model, weights, str(path))
    kept = {k for k, t in source.qtypes().items() if t == "BF16"}
    assert {k for k in headers if k.endswith(".bias") or "final_layer" in k} <= kept
    assert ("layers.0.feed_forward.w1.weight" in kept) == (qtype == "BF16")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "BF16"])
def test_the_streaming_writer_writes_the_files_gguf_writes_in_memory(dit_folder, tmp_path, qtype):
    """write_gguf_dit writes the table first and then one tensor at a time (a full-size DiT in
    bounded memory); the file is byte for byte what gguf's own in-memory path writes."""
    dst = write_gguf_dit(
        dit_folder, tmp_path / "stream.gguf", qtype, prefix="model.diffusion_model.",
        architecture="ideogram",
    )  # fmt: skip
    writer = gguf.GGUFWriter(tmp_path / "memory.gguf", arch="ideogram")
    tensors = bf16_tensors(dit_folder)
    for name in sorted(tensors):
        target = synth_gguf.ggml_type(name, tensors[name].shape, qtype, "type")
        data = synth_gguf.encode(tensors[name], target)
        writer.add_tensor("model.diffusion_model." + name, data, raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert dst.read_bytes() == (tmp_path / "memory.gguf").read_bytes()


def test_bf16_gguf_is_the_fp8_release_within_one_bf16_rounding(dit_folder, tmp_path):
    """stable-diffusion.cpp rounds f32(fp8) * f32(scale) once to bf16; the reference rounds the
    scale to bf16 first (MODEL_NOTES#fp8-dequantization): the two differ by at most one bf16
    step, and the GGUF's non-fp8 tensors are the release's bits."""
    source = GGUFSource(write_gguf_dit(dit_folder, tmp_path / "bf16.gguf", "BF16"))
    raw = mx.load(str(dit_folder / "diffusion_pytorch_model.safetensors"))
    differing = 0
    for key, value in source.load(source.headers()).items():
        scale = raw.get(key.removesuffix(".weight") + ".weight_scale")
        ours = np.array(value.astype(mx.float32))
        if scale is None:
            assert bits_equal(ours, raw[key].astype(mx.float32)), key
            continue
        reference = np.array(dequantize_fp8(raw[key], scale).astype(mx.float32))
        step = np.abs(reference) * 2.0**-7  # one bf16 step (8 significant bits)
        assert (np.abs(ours - reference) <= step).all(), key
        differing += int((ours != reference).sum())
    assert differing > 0  # the roundings do differ somewhere: the check can fail


def test_synthetic_writer_blocks_are_close_to_the_bf16_weights(dit_folder, tmp_path):
    """The test-only K-quant quantizer writes valid blocks (gguf reads them back close)."""
    bf16 = bf16_tensors(dit_folder)
    bounds = {"Q8_0": 0.01, "Q4_0": 0.15, "Q4_K": 0.1, "Q6_K": 0.03, "F16": 1e-3}
    for qtype, bound in bounds.items():
        source = GGUFSource(write_gguf_dit(dit_folder, tmp_path / f"{qtype}.gguf", qtype))
        for key, value in source.load(source.headers()).items():
            reference = (bf16[key].astype(np.uint32) << 16).view(np.float32)
            err = np.abs(np.array(value.astype(mx.float32)) - reference).max()
            assert err <= bound * np.abs(reference).max(), (qtype, key)
    assert set(TYPES) >= set(bounds)


# Bad files: one line each, naming the file and the tensor or type.


def patch(path, offset, raw: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(raw)


def type_offset(path, name) -> int:
    """Where the ggml type of tensor ``name`` sits in the tensor table."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape)


def test_bad_files_are_one_line_errors(tmp_path, dit_folder):
    good = write(tmp_path / "good.gguf", {"a.weight": (np.ones((4, 64), np.float32), None)})
    GGUFSource(good)

    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    one_line_error("notes.gguf: not a GGUF file", lambda: GGUFSource(text))
    one_line_error("missing.gguf: file not found", lambda: GGUFSource(tmp_path / "missing.gguf"))
    safetensors = dit_folder / "diffusion_pytorch_model.safetensors"
    one_line_error("not a GGUF file", lambda: GGUFSource(safetensors))

    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    one_line_error(
        r"cut.gguf: tensor 'a.weight' \(F32, shape \(4, 64\)\) ends at .* truncated",
        lambda: GGUFSource(cut),
    )
    (tmp_path / "head.gguf").write_bytes(data[:30])
    one_line_error(
        "head.gguf: not a readable GGUF file", lambda: GGUFSource(tmp_path / "head.gguf")
    )

    unknown = tmp_path / "unknown.gguf"
    unknown.write_bytes(data)
    where = type_offset(unknown, "a.weight")
    patch(unknown, where, (250).to_bytes(4, "little"))
    one_line_error(
        r"unknown.gguf: tensor 'a.weight' has ggml type 250 \(unknown\)",
        lambda: GGUFSource(unknown),
    )
    patch(unknown, where, GGML.I32.value.to_bytes(4, "little"))
    one_line_error(
        r"tensor 'a.weight' has ggml type 26 \(I32\), which is not a float",
        lambda: GGUFSource(unknown),
    )

    rows = write(tmp_path / "rows.gguf", {"a.weight": (np.ones((4, 48), np.float32), None)})
    patch(rows, type_offset(rows, "a.weight"), GGML.Q8_0.value.to_bytes(4, "little"))
    one_line_error(
        r"rows.gguf: tensor 'a.weight' \(Q8_0\) has rows of 48 values, not a multiple",
        lambda: GGUFSource(rows),
    )
    cube = write(tmp_path / "cube.gguf", {"a.weight": (np.ones((2, 4, 32), np.float32), None)})
    one_line_error(r"cube.gguf: tensor 'a.weight' has 3 dimensions", lambda: GGUFSource(cube))

    flux = write(tmp_path / "flux.gguf", {}, arch="flux")
    one_line_error(
        "flux.gguf: not an Ideogram 4 DiT \\(architecture 'flux'", lambda: GGUFSource(flux)
    )
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(other, arch="")
    writer.add_tensor("double_blocks.0.img_attn.proj.weight", np.ones((4, 32), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    one_line_error(
        "not an Ideogram 4 DiT \\(architecture none given, no embed_image_indicator",
        lambda: GGUFSource(other),
    )
    mixed = write(
        tmp_path / "mixed.gguf",
        {
            "model.diffusion_model.a.weight": (np.ones((4, 32), np.float32), None),
            "vae.b.weight": (np.ones((4, 32), np.float32), None),
        },
    )
    one_line_error(
        "mixed.gguf: tensor .* is outside model.diffusion_model.", lambda: GGUFSource(mixed)
    )

    q8_cr = write(
        tmp_path / "q8_cr.gguf",
        {"a.weight": (np.ones((4, 32), np.int8), None), "a.weight_scale": (np.ones(4), None)},
        meta=[("comfy.gguf.quant.a.weight", '{"format": "int8_tensorwise", "convrot": true}')],
    )
    one_line_error(
        "q8_cr.gguf: comfy.gguf.quant.a.weight marks the ComfyUI-GGUF fork's own Q8_CR/Q4_CR",
        lambda: GGUFSource(q8_cr),
    )

    many = tmp_path / "many.gguf"
    many.write_bytes(data)
    patch(many, 8, (10**9).to_bytes(8, "little"))  # tensor_count
    one_line_error("many.gguf: claims 1000000000 tensors", lambda: GGUFSource(many))
    patch(many, 8, (1).to_bytes(8, "little") + (10**9).to_bytes(8, "little"))  # kv_count
    one_line_error("many.gguf: claims 1000000000 metadata keys", lambda: GGUFSource(many))
    long = write(tmp_path / "long.gguf", {"a" * 300: (np.ones((4, 32), np.float32), None)})
    one_line_error("long.gguf: tensor 'a+'...: name longer than 256", lambda: GGUFSource(long))

    nan = np.ones((4, 32), np.float32)
    nan[1, 3] = np.nan
    bad = GGUFSource(write(tmp_path / "nan.gguf", {"a.weight": (nan, None)}))
    one_line_error("nan.gguf: a.weight \\(F32\\) holds NaN", lambda: bad.load(["a.weight"]))
    one_line_error("nan.gguf: has no tensor b.weight", lambda: bad.load(["b.weight"]))


def test_a_tensor_of_the_wrong_width_fails_the_config_check(dit_folder, tmp_path):
    """A DiT tensor whose shape the config does not give: the hook's config check names it."""
    bf16 = bf16_tensors(dit_folder)
    w1 = bf16.pop("layers.0.feed_forward.w1.weight")
    tensors = {k: (v.view(np.uint8), GGML.BF16) for k, v in bf16.items()}
    tensors["layers.0.feed_forward.w1.weight"] = (w1[:-32].view(np.uint8), GGML.BF16)
    path = write(tmp_path / "narrow.gguf", tensors, arch="ideogram")
    source = GGUFSource(path)
    one_line_error(
        r"intermediate_size is 256, but narrow.gguf holds layers.0.feed_forward.w1.weight of "
        r"shape \(224, 256\)",
        lambda: Ideogram4Transformer.build(dit_folder, source.headers()),
    )


def test_exact_spec_and_scale_dtypes(tmp_path):
    rng = np.random.default_rng(3)
    types = (GGML.Q8_0, GGML.Q4_0, GGML.Q5_1, GGML.Q4_K, GGML.Q5_K, GGML.Q6_K, GGML.MXFP4)
    raw = {f"q.{t.name}.weight": (random_blocks(rng, t, 4, 256), t) for t in types}
    raw["norm.weight"] = (random_blocks(rng, GGML.Q8_0, 1, 256)[0], GGML.Q8_0)
    source = GGUFSource(write(tmp_path / "spec.gguf", raw))
    assert source.format == "gguf"
    half = {k: source.exact_spec(k) for k in raw}
    full = {k: source.exact_spec(k, "float32") for k in raw}
    assert half == {
        "q.Q8_0.weight": (8, 32),
        "q.Q4_0.weight": (4, 32),
        "q.Q5_1.weight": (5, 32),
        "q.Q4_K.weight": None,
        "q.Q5_K.weight": None,
        "q.Q6_K.weight": None,
        "q.MXFP4.weight": None,  # exact, but in MLX's mxfp4 mode, not affine
        "norm.weight": None,  # 1-D: no quantized layer holds it
    }
    assert full == {**half, "q.Q4_K.weight": (4, 32), "q.Q5_K.weight": (5, 32)}
    # float16 storage of the affine triple: the same values, so still gguf's bits
    for key in ("q.Q8_0.weight", "q.Q4_0.weight", "q.Q5_1.weight"):
        triple = source.exact(key, mx.float16)
        assert triple["scales"].dtype == triple["biases"].dtype == mx.float16
        w = mx.dequantize(
            triple["weight"],
            triple["scales"].astype(mx.float32),
            triple["biases"].astype(mx.float32),
            group_size=32,
            bits=triple["bits"],
        )
        assert same_numbers(w, gguf.quants.dequantize(*raw[key])), key
    one_line_error(
        r"spec.gguf: q.Q4_K.weight \(Q4_K\) has scales that mlx.core.float16 does not hold",
        lambda: source.exact("q.Q4_K.weight", mx.float16),
    )


class MappedView:
    """Stands in for a tensor's memory-mapped view (``ReaderTensor.data``): its dtype and shape
    may be asked, its values may not (reading them would leave the file's pages resident)."""

    def __init__(self, data):
        self.dtype, self.shape = data.dtype, data.shape

    def __array__(self, *args, **kwargs):
        raise AssertionError("a tensor was read through the file's memory map")

    def reshape(self, *args):
        raise AssertionError("a tensor was read through the file's memory map")


def test_tensors_are_read_into_their_own_buffers_not_through_the_map(tmp_path):
    # Reading the memory-mapped views touched every page of the file, which stayed in the
    # process's RSS: converting a GGUF DiT peaked at the file's size + ~2 GB
    # (MODEL_NOTES#source-format-memory). Values must not change.
    rng = np.random.default_rng(4)
    raw = {f"q.{t.name}.weight": (random_blocks(rng, t, 8, 256), t) for t in gguf_file.QUANTIZED}
    floats = rng.standard_normal((4, 64)).astype(np.float32)
    raw["f16.weight"] = (floats.astype(np.float16), GGML.F16)
    raw["bf16.weight"] = (gguf.quants.quantize(floats, GGML.BF16), GGML.BF16)
    path = write(tmp_path / "all.gguf", raw)
    mapped, unmapped = GGUFSource(path), GGUFSource(path)
    unmapped._tensors = {k: t._replace(data=MappedView(t.data)) for k, t in mapped._tensors.items()}
    with pytest.raises(AssertionError, match="memory map"):
        np.asarray(unmapped._tensors["f16.weight"].data)  # the stand-in can fail
    for key in [*raw, MARKER]:
        a, b = mapped._tensors[key].data, unmapped.load([key])[key].astype(mx.float32)
        assert bits_equal(gguf.quants.dequantize(a, mapped._tensors[key].tensor_type), b), key
        for dtype in (None, mx.float32):
            want, got = mapped.exact(key, dtype), unmapped.exact(key, dtype)
            assert (want is None) == (got is None), key
            for name in () if want is None else ("weight", "scales", "biases"):
                if name in want:
                    assert mx.array_equal(want[name], got[name]).item(), (key, name)
    with path.open("r+b") as f:  # cut short after opening: the read says so, in one line
        f.truncate(path.stat().st_size - 64)
    last = max(mapped._tensors, key=lambda k: mapped._tensors[k].data_offset)
    one_line_error(
        r"all.gguf: tensor .* the file was truncated after opening", lambda: unmapped.load([last])
    )


def test_a_tensor_is_decoded_into_mlx_memory_not_copied_from_numpy(tmp_path, monkeypatch):
    """The float32 decode lands in the MLX array's own buffer: NumPy holds only the stored
    bytes and one row chunk at a time. (A NumPy result that mx.array copied was a second
    float32 llm_cond_proj, 0.98 GB, at convert's peak: MODEL_NOTES#source-format-memory.)"""
    import tracemalloc

    monkeypatch.setattr(gguf_file, "CHUNK_ELEMENTS", 1 << 15)
    monkeypatch.setattr(dtypes, "FINITE_CHUNK", 1 << 15)  # the finiteness check's chunks
    rng = np.random.default_rng(5)
    data = random_blocks(rng, GGML.Q8_0, 512, 4096)
    source = GGUFSource(write(tmp_path / "big.gguf", {"big.weight": (data, GGML.Q8_0)}))
    tracemalloc.start()  # NumPy reports its buffers to tracemalloc; MLX's are not Python's
    try:
        got = source.load(["big.weight"])["big.weight"]
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    float32_bytes = 512 * 4096 * 4
    assert numpy_peak < data.nbytes + float32_bytes // 4, (numpy_peak, float32_bytes)
    assert bits_equal(got, gguf.quants.dequantize(data, GGML.Q8_0))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K"])
def test_convert_keep_copies_the_gguf_blocks_as_they_are(tiny_checkpoint, tmp_path, qtype):
    """The converter's --quantize keep on a real GGUF reader: every linear whose ggml type MLX
    holds with float16 scales is copied (its dequantization is gguf's numbers),
    every other tensor is gguf's dequantization in float16."""
    from ideogram4_mlx.convert import convert

    path = write_gguf_dit(tiny_checkpoint / "transformer", tmp_path / "dit.gguf", qtype)
    out = convert(
        tiny_checkpoint,
        tmp_path / "out",
        components=["transformer"],
        files={"transformer": path},
        quantize="keep",
        progress=False,
    )
    converted = {}
    for shard in (out / "transformer").glob("model-*.safetensors"):
        converted.update(mx.load(str(shard)))
    source = GGUFSource(path)
    record = json.loads((out / "transformer" / "config.json").read_text())["mlx_conversion"]
    stored = {"float16": mx.float16, "bfloat16": mx.bfloat16}[record["dtype"]]
    assert record["dtype"] == ("bfloat16" if qtype == "Q4_K" else "float16")
    model = Ideogram4Transformer.build(tiny_checkpoint / "transformer", source.headers())
    reference = model.sanitize(source.load(source.headers()))
    kept = 0
    for key, value in reference.items():
        stem = key.removesuffix(".weight")
        if f"{stem}.scales" in converted:
            kept += 1
            w = mx.dequantize(
                converted[key],
                converted[f"{stem}.scales"].astype(mx.float32),
                converted[f"{stem}.biases"].astype(mx.float32),
                group_size=32,
                bits=8 if qtype == "Q8_0" else 4,
            )
            assert same_numbers(w, value), key
        else:
            # float16 where layers are kept (their scales exact), else the bfloat16 default
            assert bits_equal(
                converted[key].astype(mx.float32), value.astype(stored).astype(mx.float32)
            ), key
    # every 2-D tensor MLX holds with float16 scales (Q8_0/Q4_0: all but t_embedding and
    # final_layer, which stable-diffusion.cpp leaves BF16) but the layers the model keeps in
    # float (input_proj, adaln_proj, the indicator: its quant_predicate); Q4_K needs float32
    # scales
    modules = dict(model.named_modules())
    exact = {
        k
        for k in source.headers()
        if source.exact_spec(k)
        and model.quant_predicate(k.rpartition(".")[0], modules[k.rpartition(".")[0]]) is not False
    }
    assert kept == len(exact) and (kept == 0) == (qtype == "Q4_K")
    assert "layers.0.attention.qkv.weight" in exact or qtype == "Q4_K"

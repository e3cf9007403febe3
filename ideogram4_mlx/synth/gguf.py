"""Write a GGUF DiT the way the published ones were made, from a synthetic fp8 transformer folder.

The published files (molbal/ideogram-4-gguf) were converted from the fp8 release with
stable-diffusion.cpp (MODEL_NOTES#gguf-dit-files): its ``convert_fp8_scale_to_bf16.py`` first
(``bf16(f32(fp8) * f32(weight_scale))``, scales dropped, everything else BF16), then
``sd-cli -M convert``, which picks a ggml type per tensor. Two recipes:

- ``"type"`` (``--type q8_0`` etc.; its sizes match the published files): every tensor is
  converted except biases, ``final_layer.*``, names containing ``embedding`` (``t_embedding``)
  and tensors whose rows are not a multiple of the type's block (``input_proj``, 128 wide,
  under the 256-value K-quants); 1-D norms are quantized too;
- ``"rules"`` (the command in stable-diffusion.cpp's docs/ideogram4.md): only the block
  linears (``qkv``, ``o``, ``w1/w2/w3``, ``adaln_modulation.weight``) are quantized.

Tensors that are not converted stay BF16. The table is written first, then one tensor at a time
(memory is one tensor's, so a full-size DiT can be written). Test tooling, never imported by
generation: K-quant
blocks come from the small quantizer below (the gguf package has none); every other type from
``gguf.quants.quantize``. Readers are checked against gguf's dequantization, never against this.

    write_gguf_dit(tiny / "transformer", tmp / "dit-q4_k.gguf", "Q4_K")
"""

import re
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as GGML

from ideogram4_mlx.errors import InputError

TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")
RECIPES = ("type", "rules")
# stable-diffusion.cpp's ModelLoader::tensor_should_be_converted: never converted.
KEPT = re.compile(r"\.bias$|final_layer\.|embedding")
# --tensor-type-rules of stable-diffusion.cpp's docs/ideogram4.md.
RULES = (
    r"^layers.*adaln_modulation.*weight",
    r"layers.*attention.o.*weight",
    r"layers.*attention.qkv.*weight",
    r"layers.*feed_forward.*weight",
)
SCALE_SUFFIX = ".weight_scale"


def write_gguf_dit(
    folder: Path | str,
    dst: Path | str,
    qtype: str = "Q8_0",
    *,
    recipe: str = "type",
    prefix: str = "",
    architecture: str | None = None,
) -> Path:
    """Write the DiT of ``folder`` (a synthetic ``transformer/`` in the fp8 layout) to the new
    file ``dst`` as a GGUF of ``qtype``, chosen per tensor as ``recipe`` says; names get
    ``prefix`` (stable-diffusion.cpp's ``--diffusion-model`` adds ``model.diffusion_model.``);
    ``architecture`` None writes no metadata, as stable-diffusion.cpp does ("ideogram": the
    ComfyUI-GGUF fork's converter)."""
    if qtype not in TYPES or recipe not in RECIPES:
        raise InputError(f"qtype {qtype!r} / recipe {recipe!r}: use one of {TYPES} / {RECIPES}")
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        raise InputError(f"{dst} already exists")
    writer = gguf.GGUFWriter(dst, arch=architecture or "")
    weights = lazy_weights(folder)
    names = sorted(k for k in weights if not k.endswith(SCALE_SUFFIX))
    # The table first (shapes and types are known from the headers), then one tensor at a time:
    # memory is one tensor's, not the file's (the whole bf16 DiT is 19 GB).
    targets = {}
    for name in names:
        shape = tuple(weights[name].shape)
        targets[name] = target = ggml_type(name, shape, qtype, recipe)
        block, size = gguf.GGML_QUANT_SIZES[target]
        nbytes = int(np.prod(shape)) // block * size
        writer.add_tensor_info(prefix + name, shape, np.float32, nbytes, raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name in names:
        writer.write_tensor_data(encode(bf16_bits(weights, name), targets[name]))
    writer.close()
    return dst


def lazy_weights(folder: Path | str) -> dict[str, mx.array]:
    """Every tensor of the folder's safetensors files, loaded lazily (nothing read yet)."""
    weights = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        weights.update(mx.load(str(path)))
    return weights


def bf16_bits(weights: dict[str, mx.array], key: str) -> np.ndarray:
    """One tensor as stable-diffusion.cpp's fp8 -> bf16 step leaves it (bf16 bits, uint16):
    an fp8 weight ``bf16(f32(fp8) * f32(scale)[:, None])``; popped from ``weights`` (a
    read tensor left in the dict would keep its memory)."""
    value = weights.pop(key)
    scale = weights.get(key.removesuffix(".weight") + SCALE_SUFFIX)
    if scale is not None:
        value = mx.from_fp8(value, dtype=mx.float32) * scale[:, None]
    return np.array(value.astype(mx.bfloat16).view(mx.uint16))


def bf16_tensors(folder: Path | str, keys=None) -> dict[str, np.ndarray]:
    """The folder's DiT (or its ``keys``) as stable-diffusion.cpp's fp8 -> bf16 step leaves it:
    ``{key: bf16 bits (uint16)}``, every fp8 weight ``bf16(f32(fp8) * f32(scale)[:, None])``."""
    weights = lazy_weights(folder)
    wanted = [k for k in weights if not k.endswith(SCALE_SUFFIX) and (keys is None or k in keys)]
    return {key: bf16_bits(weights, key) for key in wanted}


def ggml_type(name: str, shape: tuple[int, ...], qtype: str, recipe: str) -> GGML:
    """The type stable-diffusion.cpp gives tensor ``name`` when converting to ``qtype``."""
    target = GGML[qtype]
    if KEPT.search(name) or (recipe == "rules" and not any(re.search(r, name) for r in RULES)):
        return GGML.BF16
    if shape[-1] % gguf.GGML_QUANT_SIZES[target][0]:
        return GGML.BF16
    return target


def encode(bits: np.ndarray, qtype: GGML) -> np.ndarray:
    """bf16 bits -> the tensor's GGUF data (bytes for quantized types, one row per row)."""
    values = (bits.astype(np.uint32) << 16).view(np.float32)
    if qtype == GGML.BF16:
        return bits.view(np.uint8)
    if qtype in K_QUANTIZERS:
        rows = values.reshape(-1, values.shape[-1])
        data = K_QUANTIZERS[qtype](rows.reshape(-1, 256))
        return data.reshape(*values.shape[:-1], -1)
    return gguf.quants.quantize(values, qtype)


# A small K-quant quantizer (min-max per group, 6/8-bit scales): valid blocks in ggml's layout,
# not llama.cpp's search for the best scales. x: (n, 256) float32 -> (n, bytes) uint8.


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape, np.float32), where=b > 0)


def _f16_bytes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    half = x.astype(np.float16)
    return half.view(np.uint8).reshape(len(x), 2), half.astype(np.float32)[:, None]


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """d, dmin (fp16), 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles: group
    2k in the low, 2k + 1 in the high nibbles of bytes 32k..32k + 31."""
    n = len(x)
    g = x.reshape(n, 8, 32)
    low = np.minimum(g.min(-1), 0)
    step, mins = (g.max(-1) - low) / 15, -low
    d_bytes, d = _f16_bytes(step.max(-1) / 63)
    m_bytes, dmin = _f16_bytes(mins.max(-1) / 63)
    sc = np.clip(np.rint(_div(step, d)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_div(mins, dmin)), 0, 63).astype(np.uint8)
    q = np.clip(np.rint(_div(g + (dmin * m)[..., None], (d * sc)[..., None])), 0, 15)
    q = q.astype(np.uint8).reshape(n, 4, 2, 32)
    scales = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            m[:, :4] | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    )
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([d_bytes, m_bytes, scales, qs], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (one per 16 values),
    d (fp16); value 128h + r: low nibble of byte 64h + r % 64 (high nibble if r >= 64), bits
    2 (r // 32) of byte 128 + 32h + r % 32."""
    n = len(x)
    g = x.reshape(n, 16, 16)
    step = np.abs(g).max(-1) / 31
    d_bytes, d = _f16_bytes(step.max(-1) / 127)
    sc = np.clip(np.rint(_div(step, d)), 0, 127).astype(np.int8)
    q = np.clip(np.rint(_div(g, (d * sc)[..., None])), -32, 31) + 32
    q = q.astype(np.uint8).reshape(n, 2, 128)
    low, high = q & 0x0F, (q >> 4).reshape(n, 2, 4, 32)
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
    qh = (high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6).reshape(
        n, 64
    )
    return np.concatenate([ql, qh, sc.view(np.uint8), d_bytes], axis=1)


K_QUANTIZERS = {GGML.Q4_K: quantize_q4_k, GGML.Q6_K: quantize_q6_k}

"""Which layers are quantized, to how many bits, and the record a converted component keeps.

Shared by the converter (``ideogram4_mlx.convert``) and the loaders (``from_pretrained``), so
both take the same per-layer decisions (STYLE convention 5). A converted component's
``config.json`` holds ``"mlx_conversion"``::

    {"version": 1, "dtype": "bfloat16", "source": "...", "converter": "ideogram4_mlx 0.1.0",
     "quantization": null | {"mode": "affine", "bits": 4, "group_size": 64, "recipe": null,
                             "overrides": {"<module path>": {"bits": 8, ...} | false}}}

Its weights are in MLX layout (fp8 dequantized, qkv fused, conv kernels transposed), which each
model's ``sanitize`` leaves as it is. ``overrides`` lists every quantizable layer whose decision
differs from the default ``bits``; ``false`` means the layer was kept in float.

Which layers a model keeps in float or at a minimum of bits is the model's own
``quant_predicate(path, module)`` (as mlx-lm's); this module applies it with the settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.nn as nn

from ideogram4_mlx.errors import InputError

RECORD_KEY = "mlx_conversion"
RECORD_VERSION = 1
MODE = "affine"
BITS = (4, 6, 8)
GROUP_SIZES = (32, 64, 128)
# A model's ``quant_predicate(path, module)``: False keeps the layer in float, True quantizes it
# at the plan's bits, ``{"bits": b}`` at no fewer than b bits.
Predicate = Callable[[str, nn.Module], bool | dict]


@dataclass(frozen=True)
class Recipe:
    """Mixed precision: ``bits`` by default, ``layer_bits`` for paths containing a name."""

    bits: int
    layer_bits: tuple[tuple[str, int], ...]
    description: str


RECIPES: dict[str, Recipe] = {
    "mixed-4-8": Recipe(
        bits=4,
        layer_bits=(("attention", 8), ("self_attn", 8)),
        description="4-bit feed-forward, 8-bit attention projections",
    ),
    # Best size/error of the recipes measured on a full-width synthetic DiT (README table):
    # the down projections write straight into the residual stream.
    "mixed-4-6": Recipe(
        bits=4,
        layer_bits=(("w2", 6), ("down_proj", 6), ("attention", 6), ("self_attn", 6)),
        description="4-bit gate/up projections, 6-bit down and attention projections",
    ),
}


def resolve_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def check_settings(bits: int | None, group_size: int, recipe: str | None) -> int | None:
    """The default bits of these settings (None: no quantization); bad ones are an InputError."""
    if recipe is not None:
        if bits is not None:
            raise InputError("give either a bit width or a recipe, not both")
        bits = resolve_recipe(recipe).bits
    if bits is None:
        return None
    if bits not in BITS:
        raise InputError(f"bits {bits} is not supported; use one of {BITS}")
    if group_size not in GROUP_SIZES:
        raise InputError(f"group size {group_size} is not supported; use one of {GROUP_SIZES}")
    return bits


def layer_bits(
    path: str,
    module: nn.Module,
    bits: int,
    group_size: int,
    recipe: str | None,
    predicate: Predicate,
) -> int | None:
    """Bits for one layer under the given settings and model predicate, or None for float."""
    if not isinstance(module, nn.Linear):
        return None
    rule = predicate(path, module)
    if rule is False or module.weight.shape[-1] % group_size:
        return None
    if recipe is not None:
        parts = set(path.split("."))
        bits = next((b for name, b in resolve_recipe(recipe).layer_bits if name in parts), bits)
    return max(bits, rule["bits"]) if isinstance(rule, dict) else bits


def quantization_plan(
    model: nn.Module, bits: int | None, group_size: int = 64, recipe: str | None = None
) -> dict | None:
    """The record's ``quantization`` entry for ``model`` (a float skeleton with a
    ``quant_predicate``), or None when these settings quantize none of its layers."""
    bits = check_settings(bits, group_size, recipe)
    if bits is None:
        return None
    overrides, quantized = {}, False
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized"):
            b = layer_bits(path, module, bits, group_size, recipe, model.quant_predicate)
            quantized |= b is not None
            if b != bits:
                overrides[path] = False if b is None else {"bits": b, "group_size": group_size}
    if not quantized:
        return None
    return {
        "mode": MODE,
        "bits": bits,
        "group_size": group_size,
        "recipe": recipe,
        "overrides": dict(sorted(overrides.items())),
    }


def check_record(quantization: object) -> None:
    """A record's ``quantization`` entry as :func:`quantization_plan` writes it (or null);
    an ``InputError`` names the first field that is off."""
    if quantization is None:
        return
    if not isinstance(quantization, dict):
        raise InputError(f"quantization is {quantization!r}, expected an object or null")
    if quantization.get("mode", MODE) != MODE:
        raise InputError(f"quantization mode is {quantization['mode']!r}, expected {MODE!r}")
    overrides = quantization.get("overrides", {})
    if not isinstance(overrides, dict):
        raise InputError(f"quantization overrides is {overrides!r}, expected an object")
    for where, entry in [("quantization", quantization), *overrides.items()]:
        if entry is False:
            continue  # a layer kept in float
        if not isinstance(entry, dict):
            raise InputError(f"overrides[{where!r}] is {entry!r}, expected false or an object")
        for key, valid in (("bits", BITS), ("group_size", GROUP_SIZES)):
            value = entry.get(key)
            if isinstance(value, bool) or value not in valid:
                raise InputError(f"{where} {key} is {value!r}, expected one of {list(valid)}")


def quantize_skeleton(model: nn.Module, record: dict | None) -> nn.Module:
    """Swap the layers a conversion quantized for ``QuantizedLinear`` (in place), before loading."""
    quantization = (record or {}).get("quantization")
    if not quantization:
        return model
    overrides = quantization.get("overrides", {})
    mode = quantization.get("mode", MODE)

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in overrides:
            override = overrides[path]
            return override and {"mode": mode, **override}
        return hasattr(module, "to_quantized")

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=mode,
        class_predicate=predicate,
    )
    return model

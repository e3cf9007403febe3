"""Which layers are quantized, how (mode, bits, group size), and the record a converted
component keeps.

Shared by the converter (``ideogram4_mlx.convert``) and the loaders (``from_pretrained``), so
both take the same per-layer decisions (STYLE convention 5). A converted component's
``config.json`` holds ``"mlx_conversion"``::

    {"version": 1, "dtype": "bfloat16", "source": "...", "converter": "ideogram4_mlx 0.1.0",
     "quantization": null | {"mode": "affine", "bits": 4, "group_size": 64, "recipe": null,
                             "overrides": {"<module path>": {"bits": 8, ...} | false}}}

Its weights are in MLX layout (fp8 dequantized, qkv fused, conv kernels transposed), which each
model's ``sanitize`` leaves as it is. ``overrides`` lists every quantizable layer whose decision
differs from the default; ``false`` means the layer was kept in float. An override carries a
``"mode"`` only where it differs from the plan's.

Modes are MLX's (``mx.quantize``): ``affine`` (4/6/8 bits, groups of 32/64/128, a float scale
and bias per group) and the float formats ``mxfp4``, ``mxfp8`` (groups of 32, e8m0 scales) and
``nvfp4`` (groups of 16, e4m3 scales), whose bits and group size are fixed and which store no
biases (MODEL_NOTES#mlx-quantization-modes). A layer the model keeps at no fewer than b bits
gets b bits in the plan's own mode when that mode has them, else affine b-bit in groups of 64:
under mxfp4 and nvfp4 the text projection is affine 8-bit, as in every affine plan (affine
8-bit has a fifth of mxfp8's weight error). A record whose layers are all affine is written
as version 1, which readers from before the float modes read unchanged; one with a float mode
is version 2, which those readers refuse, asking for an upgrade.

Which layers a model keeps in float or at a minimum of bits is the model's own
``quant_predicate(path, module)`` (as mlx-lm's); this module applies it with the settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.nn as nn

from ideogram4_mlx.errors import InputError

RECORD_KEY = "mlx_conversion"
RECORD_VERSION = 2  # the newest this reader reads; see record_version
AFFINE_RECORD_VERSION = 1
MODE = "affine"


@dataclass(frozen=True)
class Mode:
    """One MLX quantization mode: the bits and group sizes it supports, its default group size."""

    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    group_size: int


MODES: dict[str, Mode] = {
    "affine": Mode(bits=(4, 6, 8), group_sizes=(32, 64, 128), group_size=64),
    "mxfp4": Mode(bits=(4,), group_sizes=(32,), group_size=32),
    "mxfp8": Mode(bits=(8,), group_sizes=(32,), group_size=32),
    "nvfp4": Mode(bits=(4,), group_sizes=(16,), group_size=16),
}
FLOAT_MODES = tuple(m for m in MODES if m != MODE)
# Affine bits a record may hold beyond the ones --quantize offers: a layer copied as a source
# stores it (GGUF Q5_0/Q5_1/Q5_K are 5-bit, ``sources.keep``).
RECORD_AFFINE_BITS = (4, 5, 6, 8)
BITS = MODES[MODE].bits
GROUP_SIZES = MODES[MODE].group_sizes
# A model's ``quant_predicate(path, module)``: False keeps the layer in float, True quantizes it
# with the plan's setting, ``{"bits": b}`` at no fewer than b bits.
Predicate = Callable[[str, nn.Module], bool | dict]


@dataclass(frozen=True)
class Setting:
    """How one layer is quantized."""

    mode: str
    bits: int
    group_size: int

    def raised(self, minimum: int) -> Setting:
        """This setting for a layer that needs at least ``minimum`` bits (module docstring)."""
        if self.bits >= minimum:
            return self
        if minimum in MODES[self.mode].bits:
            return Setting(self.mode, minimum, self.group_size)
        return Setting(MODE, minimum, MODES[MODE].group_size)


@dataclass(frozen=True)
class Recipe:
    """Mixed precision (affine): ``bits`` by default, ``layer_bits`` for paths containing a name."""

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
QUANTIZE_CHOICES = (*(str(b) for b in BITS), *FLOAT_MODES)  # what --quantize accepts


def resolve_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def check_settings(
    quantize: int | str | None, group_size: int | None, recipe: str | None
) -> Setting | None:
    """The default setting of these options (None: no quantization); bad ones are an
    InputError. ``quantize`` is affine bits (8, 6, 4) or a float mode's name (``mxfp4``,
    ``mxfp8``, ``nvfp4``); ``group_size`` None is the mode's default."""
    if recipe is not None:
        if quantize is not None:
            raise InputError("give either a bit width or a recipe, not both")
        quantize = resolve_recipe(recipe).bits
    if quantize is None:
        return None
    if isinstance(quantize, str) and quantize in FLOAT_MODES:
        mode = MODES[quantize]
        if group_size is not None and group_size != mode.group_size:
            raise InputError(
                f"group size {group_size} does not apply to {quantize}: its groups are fixed at "
                f"{mode.group_size}; leave the group size out"
            )
        return Setting(quantize, mode.bits[0], mode.group_size)
    if isinstance(quantize, bool) or quantize not in BITS:
        raise InputError(
            f"bits {quantize} is not supported; use one of {BITS} or a float mode "
            f"({', '.join(FLOAT_MODES)})"
        )
    group_size = MODES[MODE].group_size if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise InputError(f"group size {group_size} is not supported; use one of {GROUP_SIZES}")
    return Setting(MODE, quantize, group_size)


def layer_setting(
    path: str, module: nn.Module, default: Setting, recipe: str | None, predicate: Predicate
) -> Setting | None:
    """How one layer is quantized under ``default``, the recipe and the model predicate, or
    None for float (also when its setting's group size does not divide its input width)."""
    if not isinstance(module, nn.Linear):
        return None
    rule = predicate(path, module)
    if rule is False:
        return None
    setting = default
    if recipe is not None:
        parts = set(path.split("."))
        bits = next((b for name, b in resolve_recipe(recipe).layer_bits if name in parts), None)
        setting = setting if bits is None else Setting(MODE, bits, default.group_size)
    if isinstance(rule, dict):
        setting = setting.raised(rule["bits"])
    return None if module.weight.shape[-1] % setting.group_size else setting


def quantization_plan(
    model: nn.Module,
    quantize: int | str | None,
    group_size: int | None = None,
    recipe: str | None = None,
) -> dict | None:
    """The record's ``quantization`` entry for ``model`` (a float skeleton with a
    ``quant_predicate``), or None when these settings quantize none of its layers."""
    default = check_settings(quantize, group_size, recipe)
    if default is None:
        return None
    overrides, quantized = {}, False
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized"):
            s = layer_setting(path, module, default, recipe, model.quant_predicate)
            quantized |= s is not None
            if s is None:
                overrides[path] = False
            elif s != default:
                entry = {"mode": s.mode} if s.mode != default.mode else {}
                overrides[path] = {**entry, "bits": s.bits, "group_size": s.group_size}
    if not quantized:
        return None
    return {
        "mode": default.mode,
        "bits": default.bits,
        "group_size": default.group_size,
        "recipe": recipe,
        "overrides": dict(sorted(overrides.items())),
    }


def record_version(quantization: dict | None) -> int:
    """The version a record with this ``quantization`` is written as: 1 when every layer is
    affine at 4, 6 or 8 bits (readable before the float modes and kept 5-bit layers existed),
    else :data:`RECORD_VERSION`."""
    if not quantization:
        return AFFINE_RECORD_VERSION
    settings = [quantization, *(o for o in quantization["overrides"].values() if o)]
    if any(s.get("bits") not in MODES[MODE].bits for s in settings):
        return RECORD_VERSION
    modes = {quantization["mode"]}
    modes |= {o.get("mode", MODE) for o in quantization["overrides"].values() if o}
    return AFFINE_RECORD_VERSION if modes == {MODE} else RECORD_VERSION


def check_record(quantization: object) -> None:
    """A record's ``quantization`` entry as :func:`quantization_plan` writes it (or null);
    an ``InputError`` names the first field that is off."""
    if quantization is None:
        return
    if not isinstance(quantization, dict):
        raise InputError(f"quantization is {quantization!r}, expected an object or null")
    plan_mode = quantization.get("mode", MODE)
    if not isinstance(plan_mode, str) or plan_mode not in MODES:
        raise InputError(f"quantization mode is {plan_mode!r}, expected one of {list(MODES)}")
    overrides = quantization.get("overrides", {})
    if not isinstance(overrides, dict):
        raise InputError(f"quantization overrides is {overrides!r}, expected an object")
    for where, entry in [("quantization", quantization), *overrides.items()]:
        if entry is False:
            continue  # a layer kept in float
        if not isinstance(entry, dict):
            raise InputError(f"overrides[{where!r}] is {entry!r}, expected false or an object")
        mode = entry.get("mode", plan_mode)
        if not isinstance(mode, str) or mode not in MODES:
            raise InputError(f"{where} mode is {mode!r}, expected one of {list(MODES)}")
        bits = RECORD_AFFINE_BITS if mode == MODE else MODES[mode].bits
        for key, valid in (("bits", bits), ("group_size", MODES[mode].group_sizes)):
            value = entry.get(key)
            if isinstance(value, bool) or value not in valid:
                raise InputError(
                    f"{where} {key} is {value!r}, expected one of {list(valid)} ({mode})"
                )


def quantize_skeleton(model: nn.Module, record: dict | None) -> nn.Module:
    """Swap the layers a conversion quantized for ``QuantizedLinear`` (in place), before loading.
    A layer whose width the record's group size does not divide (a damaged or foreign record:
    plans keep those in float) is an ``InputError`` naming the layer."""
    quantization = (record or {}).get("quantization")
    if not quantization:
        return model
    overrides = quantization.get("overrides", {})
    mode = quantization.get("mode", MODE)

    def predicate(path: str, module: nn.Module) -> bool | dict:
        # an override is false or an object with its group size (check_record)
        override = overrides.get(path, hasattr(module, "to_quantized"))
        if override is False:
            return False
        group_size = (quantization if override is True else override)["group_size"]
        width = getattr(module, "weight", None)
        if width is not None and width.shape[-1] % group_size:
            raise InputError(
                f"{path} is {width.shape[-1]} wide, not a multiple of its group size {group_size}"
            )
        return override if override is True else {"mode": mode, **override}

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=mode,
        class_predicate=predicate,
    )
    return model

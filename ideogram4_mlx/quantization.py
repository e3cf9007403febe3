"""Which layers are quantized, to how many bits, and the record a converted component keeps.

Shared by the converter (``ideogram4_mlx.convert``) and the loaders (``from_pretrained``), so
both take the same per-layer decisions (STYLE convention 5). A converted component's
``config.json`` holds ``"mlx_conversion"``::

    {"version": 1, "dtype": "bfloat16", "source": "...", "converter": "ideogram4_mlx 0.1.0",
     "quantization": null | {"mode": "affine", "bits": 4, "group_size": 64, "recipe": null,
                             "overrides": {"<module path>": {"bits": 8, ...} | false}}}

Its weights are in MLX layout (fp8 dequantized, qkv fused, conv kernels transposed), so the
loaders skip ``sanitize``. ``overrides`` lists every quantizable layer whose decision differs
from the default ``bits``; ``false`` means the layer was kept in float.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ideogram4_mlx.weights import (
    CheckpointError,
    component_files,
    load_safetensors,
    load_strict,
    read_json,
)

RECORD_KEY = "mlx_conversion"
RECORD_VERSION = 1
MODE = "affine"
BITS = (4, 6, 8)
GROUP_SIZES = (32, 64, 128)

# Small but sensitive layers stay in float: embeddings, the timestep/AdaLN path (it scales every
# block), the 128-channel input projection and the output layer. Norms are not Linear layers.
FLOAT_LAYERS = frozenset(
    {
        "embed_tokens",
        "embed_image_indicator",
        "t_embedding",
        "adaln_proj",
        "adaln_modulation",
        "final_layer",
        "input_proj",
    }
)
# The text-feature projection (53248 -> 4608) sees features of very different scales.
MIN_BITS = {"llm_cond_proj": 8}


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
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def layer_bits(path: str, module: nn.Module, bits: int, group_size: int, recipe: str | None):
    """Bits for one layer under the given settings, or None to keep it in float."""
    parts = set(path.split("."))
    if not isinstance(module, nn.Linear) or parts & FLOAT_LAYERS:
        return None
    if module.weight.shape[-1] % group_size:
        return None
    if recipe is not None:
        bits = next((b for name, b in resolve_recipe(recipe).layer_bits if name in parts), bits)
    return max([bits] + [b for name, b in MIN_BITS.items() if name in parts])


def quantization_plan(
    model: nn.Module, bits: int | None, group_size: int = 64, recipe: str | None = None
) -> dict | None:
    """The record's ``quantization`` entry for ``model`` (a float skeleton), or None for none."""
    if recipe is not None:
        if bits is not None:
            raise ValueError("give either a bit width or a recipe, not both")
        bits = resolve_recipe(recipe).bits
    if bits is None:
        return None
    if bits not in BITS:
        raise ValueError(f"bits {bits} is not supported; use one of {BITS}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported; use one of {GROUP_SIZES}")
    overrides = {}
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized"):
            b = layer_bits(path, module, bits, group_size, recipe)
            if b != bits:
                overrides[path] = False if b is None else {"bits": b, "group_size": group_size}
    return {
        "mode": MODE,
        "bits": bits,
        "group_size": group_size,
        "recipe": recipe,
        "overrides": dict(sorted(overrides.items())),
    }


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


def conversion_record(component_dir: Path | str) -> dict | None:
    """The ``mlx_conversion`` record of a converted component folder; None for a raw snapshot."""
    path = Path(component_dir) / "config.json"
    record = read_json(path).get(RECORD_KEY)
    if record is not None and record.get("version", 0) > RECORD_VERSION:
        raise CheckpointError(
            f"{path}: converted with format version {record['version']}, this version reads "
            f"up to {RECORD_VERSION}; upgrade ideogram4_mlx or convert again"
        )
    return record


def cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Cast floating tensors to ``dtype``; packed quantized weights (uint32) stay as they are."""
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }


def load_component(
    model: nn.Module,
    component_dir: Path,
    sanitize: Callable[[dict[str, mx.array]], dict[str, mx.array]],
    dtype: mx.Dtype,
    resident: Callable[[str], bool] | None = None,
) -> nn.Module:
    """Fill ``model`` from a raw snapshot folder (``sanitize`` applied) or a converted one
    (MLX-native already; its quantized skeleton is built first), strictly, in ``dtype``.

    Every key and shape is checked; only parameters for which ``resident(key)`` is true (all,
    by default) are read. The others stay lazy: a :class:`WeightStream` reads them later.
    """
    record = conversion_record(component_dir)
    quantize_skeleton(model, record)
    weights = read_component(component_dir, sanitize if record is None else None, dtype)
    load_strict(model, weights, str(component_dir))
    del weights
    for key, param in tree_flatten(model.parameters()):
        if resident is None or resident(key):
            # One tensor at a time: each lazily loaded fp8 tensor is freed once dequantized.
            mx.eval(param)
    return model


def read_component(
    component_dir: Path,
    sanitize: Callable[[dict[str, mx.array]], dict[str, mx.array]] | None,
    dtype: mx.Dtype,
) -> dict[str, mx.array]:
    """All parameters of a component folder as lazy arrays (nothing is read until evaluated)."""
    weights = load_safetensors(component_files(component_dir))
    return cast_floats(sanitize(weights) if sanitize is not None else weights, dtype)


class WeightStream:
    """Parameters read from disk each time a pass needs them, for ``--low-memory``.

    :meth:`take` hands out fresh lazy arrays for one key prefix; once the caller has evaluated
    with them and dropped them, their memory is free again. Costs one read of the streamed
    bytes per pass (the OS file cache usually serves repeats).
    """

    def __init__(
        self,
        component_dir: Path,
        sanitize: Callable[[dict[str, mx.array]], dict[str, mx.array]],
        dtype: mx.Dtype,
    ):
        self.component_dir = Path(component_dir)
        self.sanitize = None if conversion_record(component_dir) else sanitize
        self.dtype = dtype
        self.pending: dict[str, mx.array] = {}

    def open(self) -> None:
        """Start a pass: (re)create the lazy arrays."""
        self.pending = read_component(self.component_dir, self.sanitize, self.dtype)

    def take(self, prefix: str) -> dict:
        """The parameter tree under ``prefix``, removed from the pass (only the caller holds it)."""
        keys = [k for k in self.pending if k.startswith(prefix)]
        return tree_unflatten([(k[len(prefix) :], self.pending.pop(k)) for k in keys])

"""fp8 snapshot -> MLX checkpoint folder (bf16, 8/6/4-bit, mixed, or MLX's mxfp4/mxfp8/nvfp4),
streaming, bounded memory.

Each model component is read lazily (``mx.load``), sanitized by its model's own ``sanitize``
(fp8 dequantized exactly, qkv fused, conv kernels transposed), quantized
per layer as the model's ``quant_predicate`` and ``ideogram4_mlx.quantization`` decide, evaluated
one layer at a time and written to safetensors shards with an index. The output is MLX-native:
the loaders' ``sanitize`` leaves it as it is and the quantized skeleton is rebuilt from the
``mlx_conversion`` record in each ``config.json``. The text encoder's vision tower (``visual.*``,
which only describe uses) is carried in the float dtype, never quantized
(MODEL_NOTES#vision-tower).

Everything is written to a partial sibling folder that is renamed into place at the end
(``ideogram4_mlx.files``), so an interrupted run leaves no ``dst``, or the old one. ``force``
replaces only an empty folder or an earlier conversion: component folders whose config.json
records ``mlx_conversion``, ``tokenizer/``, ``scheduler/`` and ``model_index.json``, nothing else.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from ideogram4_mlx.config import CheckpointError, read_json
from ideogram4_mlx.convert.checks import check_keys
from ideogram4_mlx.convert.delta import check_rank, delta_bytes, write_uncond_delta
from ideogram4_mlx.convert.inputs import FILE_COMPONENTS, ComponentInput, check_format
from ideogram4_mlx.describe.vision import (
    VISION_DTYPE_RULE,
    VISION_PREFIXES,
    sanitize_visual,
    vision_parameters,
)
from ideogram4_mlx.dtypes import all_finite, dtype_name, parse_dtype
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.files import check_destination, write_folder
from ideogram4_mlx.hub import (
    ALLOW_PATTERNS,
    check_checkpoint_dir,
    check_components,
    download,
    resolve_file,
    resolve_model,
)
from ideogram4_mlx.lora import LoRAError, LoRAFile, fused_weight, linear_shapes, match, read_lora
from ideogram4_mlx.lora_spec import TARGETS, LoRASpec, parse_lora_option
from ideogram4_mlx.magic.head import HEAD_FOLDER, PromptEnhancerHead
from ideogram4_mlx.prompt import load_tokenizer
from ideogram4_mlx.quantization import (
    RECORD_KEY,
    check_settings,
    quantization_plan,
    quantize_skeleton,
    record_version,
)
from ideogram4_mlx.sources.keep import KEEP, keep_plan, kept_among, kept_tensors
from ideogram4_mlx.text_encoder import LM_PREFIXES, Qwen3VLTextEncoder
from ideogram4_mlx.transformer import DIT_COMPONENTS, Ideogram4Transformer
from ideogram4_mlx.uncond_delta import DELTA_FILE, REPORT_FILE
from ideogram4_mlx.vae import BN_PREFIX, Flux2VAE
from ideogram4_mlx.version import __version__
from ideogram4_mlx.weights import sanitized

# Shards are saved with mx.save_safetensors, which holds a whole shard in memory: 1 GiB keeps
# the peak near 2 GB (shard + the layer in flight) and stays far below the Hub's 5 GB limit.
SHARD_BYTES = 1 << 30
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class ModelComponent:
    """One component's model class: its ``build`` (config checked against the weight files),
    ``dtype_rule``, ``sanitize`` and ``quant_predicate`` do the work."""

    model: type[nn.Module]
    extras: tuple[str, ...] = ()  # source keys kept as they are (not parameters)
    carry_vision: bool = False  # the visual.* tensors too, sanitized, in float


FINAL_NORM_KEYS = tuple(f"{prefix}norm." for prefix in LM_PREFIXES)
MODEL_COMPONENTS = {
    "transformer": ModelComponent(Ideogram4Transformer),
    "unconditional_transformer": ModelComponent(Ideogram4Transformer),
    # The final norm is not a feature-tap parameter, but the magic prompt's LM applies it.
    # The vision tower is not either, but describe runs it: carried in float (0.58 B params; a
    # quantized patch embedding and position grid would shift every image token).
    "text_encoder": ModelComponent(Qwen3VLTextEncoder, extras=FINAL_NORM_KEYS, carry_vision=True),
    # The bn buffers travel along: the VAE loader checks them against the latent constants.
    "vae": ModelComponent(Flux2VAE, extras=(BN_PREFIX,)),
    # The magic prompt's lm_head, when the source bundles one: quantized like the text encoder.
    HEAD_FOLDER: ModelComponent(PromptEnhancerHead),
}
OPTIONAL_COMPONENTS = (HEAD_FOLDER,)  # converted when the source has them
COPIED_COMPONENTS = ("tokenizer", "scheduler")
COMPONENTS = (*MODEL_COMPONENTS, *COPIED_COMPONENTS)
COPIED_FILES = ("model_index.json",)
KIND = "an ideo4-mlx conversion"


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    quantize: int | str | None = None,
    group_size: int | None = None,
    recipe: str | None = None,
    components: tuple[str, ...] | list[str] | None = None,
    force: bool = False,
    progress: bool = True,
    revision: str | None = None,
    shard_bytes: int = SHARD_BYTES,
    loras: Sequence[LoRASpec | str] = (),
    uncond_as_lora: int | str | None = None,
    files: dict[str, str | Path] | None = None,
    source_format: str | None = None,
) -> Path:
    """Convert an Ideogram 4 snapshot (repo id or folder) into an MLX folder at ``dst``.

    The snapshot may be the fp8 release or any format ``ideogram4_mlx.sources`` decodes (nf4,
    nf4-diffusers, ...); ``files`` gives a DiT as one file instead (a Comfy repack or a GGUF
    file), by component name (``transformer``, ``unconditional_transformer``).

    Args:
        dtype: float dtype of every unquantized tensor (``bfloat16``, ``float16``, ``float32``);
            by default bfloat16; with ``quantize="keep"`` float16 for the components with kept
            layers (the sources' float16 scales stay exact), bfloat16 for the others.
        quantize: 8, 6 or 4 bits (affine, ``group_size`` 32/64/128, default 64), or one of
            MLX's float modes ``"mxfp4"``, ``"mxfp8"`` (groups of 32), ``"nvfp4"`` (groups of
            16; no other ``group_size``), for the DiTs and the text encoder; sensitive layers
            stay float or >= 8-bit (each model's ``quant_predicate``; ``quantization``).
            ``"none"``: float (as None). ``"keep"``: the weights a source stores the way MLX
            does (GGUF Q8_0/Q4_0/Q4_1) are copied as they are, every other one is float
            (``convert.keep``).
        recipe: a mixed-precision recipe name (e.g. ``mixed-4-8``) instead of ``quantize``.
        components: the sub-folders to write (default: all of ``COMPONENTS``).
        force: replace an existing ``dst`` that is empty or an earlier conversion.
        loras: LoRAs (``LoRASpec`` or ``"FILE[:SCALE]"``) baked into their DiT's weights:
            merged in fp32, rounded once to ``dtype``, then quantized like every other
            weight; each is recorded (name, SHA-256, scale) in that DiT's ``mlx_conversion``.
            Every LoRA module must match a layer.
        uncond_as_lora: a rank (1 .. 1024) or ``"full"``: also write the unconditional DiT as
            a delta on the conditional one (``unconditional_delta.safetensors``, a truncated
            SVD per linear of ``W_uncond - W_cond`` plus exact differences of the small
            tensors; ``full``: exact differences of all) and its per-layer reconstruction
            errors (``unconditional_delta.json``), and leave ``unconditional_transformer/`` out
            of ``dst`` unless ``components`` names it (``convert.delta``).
        files: ``{component: file}``: the DiTs read from single files; their config.json comes
            from the snapshot's folder of that name when it has one, else the real model's.
        source_format: ``--from``: the format the DiTs must hold (files or SRC's folders; the
            other components are read in whatever format they hold) (``fp8``,
            ``nf4``, ``comfy``, ``gguf``, or a full name such as ``comfy-nvfp4``).

    Returns:
        ``dst``. Raises ``CheckpointError`` for a damaged source, ``FileExistsError`` for a
        ``dst`` that must not be replaced (see ``ideogram4_mlx.files``), ``ModelAccessError``
        for a refused download, ``OSError`` for a full disk.
    """
    keep = quantize == KEEP
    if keep and recipe is not None:
        raise InputError("--quantize keep copies the source's own quantization; drop --recipe")
    if keep and loras:
        raise InputError(
            "--quantize keep copies the source's quantized weights as they are, which a baked "
            "LoRA would change: drop --lora (apply it with generate --lora), or give bits"
        )
    quantize = None if quantize in ("none", KEEP) else quantize
    if keep and uncond_as_lora is not None:
        raise InputError("--quantize keep and --uncond-as-lora: give one of them")
    # keep: fp16 for the components with kept layers, bf16 for the others (build_skeleton)
    dtype = dtype or (None if keep else "bfloat16")
    if dtype is not None:
        parse_dtype(dtype)  # checks the name only
    check_settings(quantize, group_size, recipe)
    uncond_as_lora = check_rank(uncond_as_lora)
    if uncond_as_lora == "full" and (quantize is not None or recipe is not None or keep):
        raise InputError(
            "--uncond-as-lora full adds exact differences to the conditional DiT's weights, "
            "which quantizing leaves no float copy of: give a rank, or convert unquantized"
        )
    default = components is None
    components = check_components(components, COMPONENTS)
    if default and uncond_as_lora is not None:  # the delta stands in for it
        components = tuple(n for n in components if n != DIT_COMPONENTS[1][0])
    dst = Path(dst).expanduser()
    check_apart(Path(src).expanduser(), dst)
    check_destination(dst, force, foreign_entry, KIND)  # before a download can start
    inputs = file_inputs(files)
    src_dir, source = resolve_source(src, revision, tuple(inputs))
    if default:
        components = tuple(
            n for n in components if n not in OPTIONAL_COMPONENTS or (src_dir / n).is_dir()
        )
    delta_sources = [n for n, _ in DIT_COMPONENTS] if uncond_as_lora is not None else []
    if inputs and delta_sources:
        raise InputError("--uncond-as-lora reads both DiTs from SRC's folders, not from files")
    for name in (*components, *delta_sources):
        folder = src_dir / name
        if name not in inputs and not folder.is_dir():
            raise CheckpointError(f"{folder}: folder not found (the source has no {name})")
        if name in MODEL_COMPONENTS:
            if name not in inputs:
                inputs[name] = ComponentInput.folder(folder)
            if name in FILE_COMPONENTS:  # --from names the DiTs' format (the bulk of a source)
                check_format(name, inputs[name].format, source_format)
    if "tokenizer" in components:
        load_tokenizer(src_dir / "tokenizer")  # a damaged tokenizer fails before any writing
    # and LoRAs that do not fit, likewise (a delta reads both DiTs, with their LoRAs)
    baked = read_loras(src_dir, (*components, *delta_sources), loras, inputs)

    bits = KEEP if keep else quantize
    settings = dict(dtype=dtype, bits=bits, group_size=group_size, recipe=recipe, source=source)
    settings["loras"] = baked
    settings["files"] = {name: str(inp.files[0]) for name, inp in inputs.items() if inp.single}
    needed = output_bytes(src_dir, components, settings, inputs)
    if uncond_as_lora is not None:
        needed += delta_bytes(src_dir, uncond_as_lora, parse_dtype(dtype))
    with write_folder(dst, force, foreign_entry, KIND, needed) as tmp:
        for name in components:
            if name in MODEL_COMPONENTS:
                convert_component(
                    src_dir / name, tmp / name, name, settings, progress, shard_bytes, inputs[name]
                )
            else:
                shutil.copytree(src_dir / name, tmp / name)
        for name in COPIED_FILES:
            if (src_dir / name).is_file():
                shutil.copyfile(src_dir / name, tmp / name)
        if uncond_as_lora is not None:
            write_uncond_delta(src_dir, tmp, uncond_as_lora, settings, progress)
    return dst


def file_inputs(files: dict[str, str | Path] | None) -> dict[str, ComponentInput]:
    """The DiTs given as single files, opened and checked (before anything is downloaded)."""
    inputs = {}
    for name, path in (files or {}).items():
        if name not in FILE_COMPONENTS:
            raise InputError(f"{name}: only {' and '.join(FILE_COMPONENTS)} can be a file")
        inputs[name] = ComponentInput.file(Path(path))
    return inputs


def build_model(src_dir: Path, name: str, inp: ComponentInput | None) -> nn.Module:
    """The float skeleton of a component: from its folder, or from a single file's headers."""
    model = MODEL_COMPONENTS[name].model
    if inp is None or not inp.single:
        return model.build(src_dir / name)
    return model.build(src_dir / name, inp.headers())


def read_loras(
    src_dir: Path,
    components: tuple[str, ...],
    loras: Sequence[LoRASpec | str],
    inputs: dict[str, ComponentInput],
) -> dict[str, list[tuple[LoRAFile, float]]]:
    """The LoRAs to bake, by DiT folder name, each read and matched against its DiT."""
    baked: dict[str, list[tuple[LoRAFile, float]]] = {}
    for spec in loras:
        spec = (parse_lora_option(spec) if isinstance(spec, str) else spec).resolved()
        name = DIT_COMPONENTS[TARGETS.index(spec.target)][0]
        if name not in components:
            raise LoRAError(f"LoRA {spec.source} is for {name}, which is not being converted")
        lora = read_lora(resolve_file(spec.source))
        match(lora, linear_shapes(build_model(src_dir, name, inputs.get(name))))
        baked.setdefault(name, []).append((lora, spec.scale))
    return baked


def resolve_source(
    src: str | Path, revision: str | None, from_files: tuple[str, ...] = ()
) -> tuple[Path, str]:
    """A local folder as it is (it may hold only some components), else a Hub download: of
    only the config of the components given as files (``from_files``)."""
    path = Path(src).expanduser()
    if path.exists():
        return path, str(path)
    if not from_files:
        folder, model_id, revision = resolve_model(str(src), revision)
        return folder, f"{model_id}@{revision}"
    patterns = [
        f"{name}/config.json" if name in from_files else pattern
        for pattern in ALLOW_PATTERNS
        for name in [pattern.partition("/")[0]]
    ]
    folder = check_checkpoint_dir(download(str(src), revision, patterns))
    return folder, f"{src}@{revision or folder.name}"


def check_apart(src: Path, dst: Path) -> None:
    """A local source and the output folder are different folders, neither inside the other
    (replacing one would delete the other)."""
    if not src.exists():
        return  # a repo id
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise InputError(
            f"{dst}: the output folder and the source {src} must not be the same or inside "
            "each other; choose an output folder outside the source"
        )


def foreign_entry(dst: Path) -> str | None:
    """The first thing in ``dst`` that an earlier conversion would not have written, or None."""
    for entry in sorted(dst.iterdir()):
        if entry.is_symlink():
            return entry.name
        if entry.name in MODEL_COMPONENTS and entry.is_dir():
            if not is_converted(entry):
                return f"{entry.name}/config.json has no {RECORD_KEY} record"
        elif not (
            (entry.name in COPIED_COMPONENTS and entry.is_dir())
            or (entry.name in (*COPIED_FILES, DELTA_FILE, REPORT_FILE) and entry.is_file())
        ):
            return entry.name
    return None


def is_converted(component_dir: Path) -> bool:
    try:
        config = read_json(component_dir / "config.json")
    except (CheckpointError, OSError, ValueError):
        return False
    return isinstance(config, dict) and RECORD_KEY in config


def output_bytes(
    src_dir: Path, components: tuple[str, ...], settings: dict, inputs: dict[str, ComponentInput]
) -> int:
    """The size of the whole output: skeleton sizes in the target dtype plus copied files."""
    total = sum(
        (src_dir / name).stat().st_size for name in COPIED_FILES if (src_dir / name).is_file()
    )
    for name in components:
        if name in MODEL_COMPONENTS:
            skeleton = build_skeleton(src_dir / name, name, settings, inputs[name])
            model, dtype = skeleton.model, parse_dtype(skeleton.record["dtype"])
            total += sum(
                v.size * (dtype.size if mx.issubdtype(v.dtype, mx.floating) else v.itemsize)
                for _, v in tree_flatten(model.parameters())
            )
            if MODEL_COMPONENTS[name].carry_vision:
                total += vision_parameters(inputs[name].headers()) * dtype.size
        else:
            total += sum(p.stat().st_size for p in (src_dir / name).rglob("*") if p.is_file())
    return total


# ---------------------------------------------------------------------------------------------
# One component.


class Skeleton(NamedTuple):
    config: dict  # the config.json to write
    model: nn.Module  # quantized as planned; lazy
    record: dict  # mlx_conversion
    expected: dict  # float parameter shapes
    kept: dict[str, list[str]]  # --quantize keep: weight key -> source keys copied as they are


def build_skeleton(src_dir: Path, name: str, settings: dict, inp: ComponentInput) -> Skeleton:
    """The component's config, quantized skeleton, record and parameter shapes; lazy."""
    model = build_model(src_dir.parent, name, inp)
    config = read_config(src_dir) if (src_dir / "config.json").is_file() else model.config.to_json()
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    dtype = settings["dtype"]
    if settings["bits"] == KEEP:
        scales = dtype_name(parse_dtype(dtype or "float16"))
        quantization, kept = keep_plan(model, inp, scales)
        dtype = dtype or ("float16" if kept else "bfloat16")
    else:
        quantization, kept = (
            quantization_plan(model, settings["bits"], settings["group_size"], settings["recipe"]),
            {},
        )
    record = {
        "version": record_version(quantization),
        "converter": f"ideogram4_mlx {__version__}",
        "source": settings["files"].get(name, settings["source"]),
        "format": inp.format,
        "dtype": dtype_name(parse_dtype(dtype)),
        "quantization": quantization,
    }
    baked = settings.get("loras", {}).get(name, [])
    if baked:
        record["loras"] = [
            {"name": lora.name, "sha256": lora.sha256, "scale": scale, "layout": lora.layout}
            for lora, scale in baked
        ]
    quantize_skeleton(model, record)
    return Skeleton(config, model, record, expected, kept)


def convert_component(
    src_dir: Path,
    out_dir: Path,
    name: str,
    settings: dict,
    progress: bool,
    shard_bytes: int,
    inp: ComponentInput,
) -> None:
    """Stream one component (a folder, or a DiT file) into ``out_dir``: shards, index and the
    annotated config. The input's groups are read one after the other (``convert.inputs``)."""
    spec = MODEL_COMPONENTS[name]
    config, model, record, expected, kept = build_skeleton(src_dir, name, settings, inp)
    dtype = parse_dtype(record["dtype"])
    targets = dict(tree_flatten(model.parameters()))  # lazy: shapes and dtypes only
    modules = dict(model.named_modules())

    where = inp.files[0] if inp.single else src_dir
    key_files = inp.check_dtypes(spec.model.dtype_rule)
    if spec.carry_vision:
        inp.check_dtypes(VISION_DTYPE_RULE)
    # Keys and shapes checked on placeholders (never evaluated) before any tensor is read.
    shapes = inp.placeholders()
    for key in [k for k in shapes if k.startswith((*spec.extras, *VISION_PREFIXES))]:
        shapes.pop(key)
    check_keys(sanitized(model, shapes, where), expected, key_files, where)
    deltas: dict[str, list] = {}
    for lora, scale in settings.get("loras", {}).get(name, []):
        for target, items in lora.deltas.items():
            deltas.setdefault(f"{target}.weight", []).extend((d, scale) for d in items)

    out_dir.mkdir(parents=True)
    total = sum(
        v.size * (dtype.size if mx.issubdtype(v.dtype, mx.floating) else v.itemsize)
        for v in targets.values()
    ) + (vision_parameters(inp.headers()) * dtype.size if spec.carry_vision else 0)
    writer = ShardWriter(out_dir, shard_bytes)
    with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:

        def write(tensors: dict[str, mx.array], key: str, value: mx.array | None = None) -> None:
            """One parameter's tensors, checked against the skeleton, added, then checked
            finite: ``value``, what they are made of (``mx.quantize`` turns a NaN into finite
            codes without a word), or the tensors themselves (kept ones)."""
            for k, t in tensors.items():
                if t.shape != targets[k].shape:  # converter and loader disagree: a bug
                    raise RuntimeError(f"{k}: shape {t.shape} != skeleton {targets[k].shape}")
            made_of = tuple(tensors.values()) if value is None else (value,)
            writer.add(tensors, made_of)
            for t in made_of:
                finite(key, t, key_files.get(key, where))
            bar.update(sum(t.nbytes for t in tensors.values()))

        for group in inp.groups():
            copied, skipped = kept_among(kept, group)
            weights = inp.load(k for k in group if k not in skipped)
            extras = {k: weights.pop(k) for k in list(weights) if k.startswith(spec.extras)}
            carried = sanitize_visual(weights) if spec.carry_vision else {}
            weights = sanitized(model, weights, where)
            for key in sorted(copied):  # --quantize keep: as the source stores them
                write(kept_tensors(key, copied[key], inp, dtype), key)
            for key in sorted(weights):
                value = weights.pop(key)
                if key in deltas:  # a baked LoRA: merged in fp32, then one rounding to dtype
                    value = fused_weight(value.astype(mx.float32), deltas.pop(key))
                value = value.astype(dtype)  # the decode is freed once the cast is made
                write(convert_tensor(key, value, modules), key, value)
            for key in sorted(extras):
                value = extras.pop(key)
                writer.add({key: value})
                finite(key, value, key_files.get(key, where))
            for key in sorted(carried):
                value = carried.pop(key).astype(dtype)
                writer.add({key: value})
                finite(key, value, key_files.get(key, where))
                bar.update(value.nbytes)
    weight_map, total_size = writer.close()
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    config[RECORD_KEY] = record
    # the weights are no longer fp8; other loaders must not take them for the fp8 format
    config.pop("ideogram_fp8_weight_only", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def finite(key: str, value: mx.array, where: Path) -> None:
    """Refuse a float tensor holding NaN or infinity."""
    if not all_finite(value):
        overflow = (
            " or values beyond float16's range (+-65504: --dtype bfloat16 keeps them)"
            if value.dtype == mx.float16
            else ""
        )
        raise CheckpointError(
            f"{where}: {key} holds NaN or infinite values{overflow}; the source is damaged: "
            "download it again"
        )


def convert_tensor(key: str, value: mx.array, modules: dict) -> dict[str, mx.array]:
    """One parameter in the target dtype; the weight of a quantized layer becomes what
    ``mx.quantize`` returns in its mode: packed weight and scales, and biases (affine only)."""
    path, _, leaf = key.rpartition(".")
    module = modules.get(path)
    if leaf != "weight" or not isinstance(module, nn.QuantizedLinear):
        return {key: value}
    wq, scales, *biases = mx.quantize(value, module.group_size, module.bits, mode=module.mode)
    return {key: wq, f"{path}.scales": scales} | {f"{path}.biases": b for b in biases}


def read_config(src_dir: Path) -> dict:
    path = src_dir / "config.json"
    config = read_json(path)
    if RECORD_KEY in config:
        raise CheckpointError(f"{path}: already converted ({RECORD_KEY} is set); use it as it is")
    return config


class ShardWriter:
    """Evaluates tensors as they come and saves them in shards of at most ``max_bytes``."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_size = 0

    def add(self, tensors: dict[str, mx.array], sources: tuple[mx.array, ...] = ()) -> None:
        """Evaluate ``tensors`` (with ``sources``, what they are made of, for the caller to
        check) once a full shard is written: the shard and the layer are never held at once."""
        nbytes = sum(t.nbytes for t in tensors.values())
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        tensors = {k: mx.contiguous(t) for k, t in tensors.items()}
        mx.eval(*tensors.values(), *sources)  # one layer at a time; its fp8 source is freed here
        self.pending.update(tensors)
        self.pending_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"model-{len(self.shards) + 1:05d}.safetensors"
        try:
            mx.save_safetensors(str(path), self.pending, metadata={"format": "mlx"})
        except RuntimeError as e:  # mlx names no file; write(2) failing is a full disk in practice
            if not str(e).startswith("[write] Unable to write"):
                raise
            raise OSError(errno.ENOSPC, str(e), str(path)) from e
        self.shards.append(sorted(self.pending))
        self.total_size += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0
        mx.clear_cache()

    def close(self) -> tuple[dict[str, str], int]:
        """Flush, name the shards ``model-0000i-of-0000n`` and return (weight map, bytes)."""
        self.flush()
        weight_map = {}
        n = len(self.shards)
        for i, keys in enumerate(self.shards, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"model-{i:05d}.safetensors", self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        return weight_map, self.total_size

"""LoRA adapters for the DiTs: read the layouts people train, map them onto our module names,
apply them exactly.

Layouts (detected per file, see :func:`read_lora`):
- diffusers/PEFT: ``transformer.layers.N.attention.to_q.lora_A.weight`` (split q/k/v, ``to_out.0``),
  alphas in the safetensors metadata (``lora_adapter_metadata``), else alpha = rank;
- ai-toolkit: ``diffusion_model.`` prefix, the checkpoint's own names (fused ``attention.qkv``,
  ``attention.o``), ``lora_A``/``lora_B`` or kohya ``lora_down``/``lora_up`` with ``.alpha``;
- DiffSynth-Studio: no prefix, the checkpoint's names, ``lora_A``/``lora_B`` (``.default.``
  kept or not), no alpha (scale 1; an ``.alpha`` is honoured as alpha / rank);
- split names without a prefix (``layers.N.attention.to_q``, ``to_out.0``).

Full differences (kohya / ai-toolkit / ComfyUI ``.diff`` for a weight, ``.diff_b`` for a bias,
e.g. on norms) are read into :attr:`LoRAFile.diffs` by parameter path; only an unconditional
delta (``ideogram4_mlx.uncond_delta``) applies them: :func:`match` refuses them for ``--lora``.

Tensors in bf16, fp16 (what trainers save) or fp32 are read exactly into fp32 (fp64 rounded).

A LoRA delta on a linear with weight ``W`` (out, in) is ``scale * up @ down`` with ``down``
(r, in) and ``up`` (out, r); ``scale`` = the user's scale times alpha / r. Split ``to_q``/``to_k``/
``to_v`` deltas land on the Q, K and V row thirds of the fused ``attention.qkv``
(MODEL_NOTES#dit-keys).

Applied unfused by default (:func:`apply_loras`): the linear's class is swapped for one that
adds ``(x @ down.T) @ up.T * scale`` to the base output, so it is exact on fp8-dequantized,
bf16 and quantized bases, keeps the checkpoint's parameter names (loading, low-memory
streaming and quantization see no difference) and the scale can change without reloading.
:func:`fuse_loras` merges into float weights instead (fp32 sum, one rounding).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import regex
from safetensors import SafetensorError, safe_open

from ideogram4_mlx.errors import InputError

# File prefixes of the DiT in the layouts above (the first that every DiT key has is removed).
DIT_PREFIXES = (
    "transformer.",
    "model.diffusion_model.",
    "diffusion_model.",
    "conditional_transformer.",
    "base_model.model.",
)
# Keys of text-encoder LoRAs (diffusers, kohya): recognised, and refused by name.
TEXT_ENCODER_PREFIXES = ("text_encoder.", "lora_te", "te_", "text_model.")
# diffusers' split attention names -> (our fused module, row third).
SPLIT_QKV = {"to_q": 0, "to_k": 1, "to_v": 2}
KEY_PATTERN = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$"
)
ALPHA_PATTERN = re.compile(r"^(?P<module>.+?)\.alpha$")
# Full differences of a module's weight (``.diff``) or bias (``.diff_b``), as kohya writes them.
DIFF_PATTERN = re.compile(r"^(?P<module>.+?)\.(?P<part>diff|diff_b)$")
DIFF_PARAMETERS = {"diff": "weight", "diff_b": "bias"}
# Bounds on what a file can make us allocate: ranks above this are not LoRAs.
MAX_RANK = 1024
METADATA_KEY = "lora_adapter_metadata"
# The training settings ``train-lora`` records in the header (JSON); ``lora-info`` shows them.
TRAINING_KEY = "ideogram4_mlx_training"
# What trainers save (ai-toolkit and diffusers bf16, kohya fp16): all read exactly into fp32;
# F64 (numpy-made files) is rounded to fp32.
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")
# An ``.alpha`` may also be an integer (kohya writes torch.tensor(alpha) for an int alpha).
ALPHA_DTYPES = (*WEIGHT_DTYPES, "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
MAX_PATTERN_LENGTH = 256  # alpha_pattern keys are regular expressions run on every module name
MAX_PATTERNS = 4096  # an alpha_pattern entry per module of both DiTs fits many times over
# A short regex can still backtrack for ages (`(.|.)*Z`); `regex` stops a match at a deadline.
PATTERN_SECONDS = 0.25
PEFT_PREFIX = r"(.*\.)?("  # peft's get_pattern_key: a dot-bounded suffix of the module name
PEFT_FIX = "fix it or re-save the LoRA with diffusers' save_lora_weights"


class LoRAError(InputError):
    """A LoRA file that cannot be applied: unsupported keys, unmatched modules, wrong shapes."""


@dataclass
class Delta:
    """One low-rank update of one linear: ``scale * up @ down`` on its rows (all, or a third)."""

    down: mx.array  # (r, in)
    up: mx.array  # (out or out / 3, r)
    alpha_scale: float  # alpha / r (1 when the file has no alpha)
    source: str  # the file key of ``up``, for messages
    third: int | None = None  # 0, 1, 2: the q, k or v rows of a fused qkv


@dataclass
class LoRAFile:
    """A parsed LoRA: ``deltas`` by our module path (``layers.3.attention.qkv``)."""

    path: Path
    sha256: str
    layout: str
    deltas: dict[str, list[Delta]]
    text_encoder_keys: list[str] = field(default_factory=list)
    # Full differences by parameter path (``layers.0.attention_norm1.weight``), fp32.
    diffs: dict[str, mx.array] = field(default_factory=dict)
    diff_sources: dict[str, str] = field(default_factory=dict)  # parameter path -> file key
    training: str | None = None  # the header's TRAINING_KEY entry (train-lora's settings)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ranks(self) -> list[int]:
        return sorted({d.down.shape[0] for ds in self.deltas.values() for d in ds})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _strip_prefix(keys: list[str]) -> tuple[str, list[str]]:
    for prefix in DIT_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix, [k[len(prefix) :] for k in keys]
    return "", keys


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _peft_alphas(path: Path, metadata: dict | None) -> tuple[float | None, dict, bool]:
    """(lora_alpha, alpha_pattern as {compiled key: alpha}, use_rslora) from diffusers'
    ``lora_adapter_metadata`` (the peft ``LoraConfig``, keys prefixed ``transformer.``)."""
    if not metadata or METADATA_KEY not in metadata:
        return None, {}, False
    where = f"{path}: {METADATA_KEY} in the file header"
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise LoRAError(f"{where} is not valid JSON ({e}); {PEFT_FIX}") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{where} is not a JSON object (a peft LoraConfig); {PEFT_FIX}")
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    alpha = config.get("lora_alpha")
    if alpha is not None and not _finite_number(alpha):
        raise LoRAError(f"{where}: lora_alpha {alpha!r} is not a finite number; {PEFT_FIX}")
    rslora = config.get("use_rslora")
    if rslora is not None and not isinstance(rslora, bool):
        raise LoRAError(f"{where}: use_rslora is {rslora!r}, not true or false; {PEFT_FIX}")
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise LoRAError(
            f"{where}: alpha_pattern is a {type(pattern).__name__}, not an object "
            f"{{module pattern: alpha}}; {PEFT_FIX}"
        )
    if len(pattern) > MAX_PATTERNS:
        raise LoRAError(
            f"{where}: alpha_pattern has {len(pattern)} keys, over the {MAX_PATTERNS} this "
            f"reader takes; {PEFT_FIX}"
        )
    compiled = {}
    for key, value in pattern.items():
        if not _finite_number(value):
            raise LoRAError(
                f"{where}: alpha_pattern[{key!r}] is {value!r}, not a finite number; {PEFT_FIX}"
            )
        compiled[_peft_pattern(where, key)] = float(value)
    return alpha, compiled, rslora is True


def _peft_pattern(where: str, key: str) -> regex.Pattern:
    r"""An ``alpha_pattern`` key as peft's ``get_pattern_key`` matches it,
    ``re.match(rf"(.*\.)?({key})$", name)``: the key matches a dot-bounded suffix of the module
    name (``1.w1`` is ``layers.1.w1``, not ``layers.11.w1``; ``layers.1`` names no linear)."""
    if len(key) > MAX_PATTERN_LENGTH:
        raise LoRAError(
            f"{where}: alpha_pattern key {key[:40]!r}... is {len(key)} characters, over the "
            f"{MAX_PATTERN_LENGTH} of a module pattern; {PEFT_FIX}"
        )
    try:
        regex.compile(key, flags=regex.VERSION0)
    except regex.error as e:
        raise LoRAError(
            f"{where}: alpha_pattern key {key!r} is not a valid regular expression ({e}); "
            f"{PEFT_FIX}"
        ) from None
    return regex.compile(rf"{PEFT_PREFIX}{key})", flags=regex.VERSION0)


def _pattern_alpha(path: Path, module: str, default: float | None, pattern: dict) -> float | None:
    for key, value in pattern.items():  # the first key that matches, as peft takes it
        try:
            if key.fullmatch(module, timeout=PATTERN_SECONDS):
                return value
        except TimeoutError:
            raise LoRAError(
                f"{path}: alpha_pattern key {key.pattern.removeprefix(PEFT_PREFIX)[:-1]!r} took "
                f"over {PATTERN_SECONDS} s to match {module!r} (a regular expression that "
                f"backtracks); {PEFT_FIX}"
            ) from None
    return default


def _read_tensors(path: Path) -> tuple[dict[str, mx.array], dict | None]:
    """The tensors of a LoRA file (fp32, fp16 or bf16 as stored; fp64 as fp32) and its header
    metadata.

    The header is checked first (each key's dtype) so that nothing unreadable is read; MLX
    then reads the values (numpy has no bf16; MLX no fp64, numpy reads those files) after
    checking each tensor's bytes lie inside the file, so a file can make us read no more than
    its own size."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata()
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise LoRAError(f"{path} is not a readable safetensors file ({e})") from None
    for key, dtype in dtypes.items():
        if ALPHA_PATTERN.match(key) and dtype not in ALPHA_DTYPES:
            raise LoRAError(
                f"{path}: {key} is {dtype}: an alpha must be a float or an integer; re-save it "
                "as one"
            )
        if not ALPHA_PATTERN.match(key) and dtype not in WEIGHT_DTYPES:
            raise LoRAError(
                f"{path}: {key} is {dtype}: LoRA weights are floating point (F32, F16, BF16 "
                "or F64); re-save the LoRA as F32, F16 or BF16"
            )
    if "F64" in dtypes.values() and "BF16" in dtypes.values():
        raise LoRAError(
            f"{path} mixes F64 and BF16 tensors, which no reader here takes together; re-save "
            "the LoRA in one dtype (F32, F16 or BF16)"
        )
    try:
        if "F64" in dtypes.values():
            with safe_open(str(path), framework="numpy") as f:
                return {k: mx.array(f.get_tensor(k).astype(np.float32)) for k in f.keys()}, metadata
        return mx.load(str(path)), metadata
    except (RuntimeError, ValueError, SafetensorError) as e:
        raise LoRAError(f"{path} is not a readable safetensors file ({e})") from None


def _alpha(path: Path, key: str, tensor: mx.array) -> float:
    if tensor.shape not in ((), (1,)):
        raise LoRAError(
            f"{path}: {key} has shape {tensor.shape}; an alpha is one number (shape () or "
            "(1,)): fix the file or drop the key (alpha = rank)"
        )
    alpha = tensor.reshape(()).astype(mx.float32).item()
    if not math.isfinite(alpha):
        raise LoRAError(
            f"{path}: {key} is {alpha}; an alpha must be a finite number: fix the file or drop "
            "the key (alpha = rank)"
        )
    return alpha


def read_lora(path: Path | str) -> LoRAFile:
    """Parse a LoRA safetensors file (any layout above; fp32, fp16 or bf16) into fp32 deltas
    on our module names.

    Raises :class:`LoRAError` naming the file and key for keys that are no LoRA (DoRA, LoKr,
    stray tensors), other dtypes, a ``down`` without its ``up``, ranks that disagree or exceed
    :data:`MAX_RANK`, an alpha that is not one finite number, a malformed peft header
    (``lora_alpha``, ``alpha_pattern``) and non-finite values.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"LoRA {path} does not exist")
    tensors, metadata = _read_tensors(path)
    keys = list(tensors)
    text_keys = [k for k in keys if k.startswith(TEXT_ENCODER_PREFIXES)]
    dit_keys = [k for k in keys if k not in set(text_keys)]
    prefix, names = _strip_prefix(dit_keys)
    by_name = dict(zip(names, dit_keys, strict=True))
    pairs: dict[str, dict[str, str]] = {}
    alphas: dict[str, float] = {}
    diffs: dict[str, mx.array] = {}
    diff_sources: dict[str, str] = {}
    for name, key in by_name.items():
        if m := KEY_PATTERN.match(name):
            part = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(m["part"], m["part"])
            pairs.setdefault(m["module"], {})[part] = key
        elif m := ALPHA_PATTERN.match(name):
            alphas[m["module"]] = _alpha(path, key, tensors[key])
        elif m := DIFF_PATTERN.match(name):
            value = tensors[key].astype(mx.float32)
            if not mx.isfinite(value).all().item():
                raise LoRAError(
                    f"{path}: {key} holds NaN or inf; the file is damaged: download or export "
                    "it again"
                )
            target = f"{m['module']}.{DIFF_PARAMETERS[m['part']]}"
            diffs[target], diff_sources[target] = value, key
        else:
            kind = "DoRA" if "dora" in name or "magnitude" in name else "not a LoRA weight"
            raise LoRAError(f"{path}: key {key} is {kind}; only plain LoRA (A/B) is supported")
    peft_alpha, alpha_pattern, rslora = _peft_alphas(path, metadata)
    deltas: dict[str, list[Delta]] = {}
    for module, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            have = next(iter(parts.values()))
            raise LoRAError(
                f"{path}: {have} has no matching lora_{'B' if 'lora_A' in parts else 'A'}"
            )
        down, up = tensors[parts["lora_A"]], tensors[parts["lora_B"]]
        if down.ndim == 4 and down.shape[2:] == (1, 1):  # 1x1 conv form of a linear LoRA
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        rank = down.shape[0] if down.ndim == 2 else -1
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != rank or not 1 <= rank <= MAX_RANK:
            raise LoRAError(
                f"{path}: {parts['lora_A']} {down.shape} and {parts['lora_B']} {up.shape} are "
                f"not a LoRA pair (down (r, in), up (out, r), r <= {MAX_RANK})"
            )
        down, up = down.astype(mx.float32), up.astype(mx.float32)  # exact from fp16 and bf16
        for key, value in ((parts["lora_A"], down), (parts["lora_B"], up)):
            if not mx.isfinite(value).all().item():
                raise LoRAError(
                    f"{path}: {key} holds NaN or inf; the LoRA is damaged: download or export "
                    "it again"
                )
        alpha = alphas.get(module, _pattern_alpha(path, module, peft_alpha, alpha_pattern))
        # peft scales by alpha / r, or alpha / sqrt(r) with use_rslora; no alpha: alpha = r
        per_rank = alpha / (math.sqrt(rank) if rslora else rank) if alpha is not None else 1.0
        target, third = map_module(module)
        deltas.setdefault(target, []).append(Delta(down, up, per_rank, parts["lora_B"], third))
    layout = detect_layout(prefix, list(pairs), any(".lora_down" in k for k in keys), metadata)
    training = (metadata or {}).get(TRAINING_KEY)
    return LoRAFile(
        path, file_sha256(path), layout, deltas, text_keys, diffs, diff_sources, training
    )


def map_module(name: str) -> tuple[str, int | None]:
    """A file's module name (prefix removed) -> (our module path, q/k/v third or None)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] == "attention" and parts[-1] in SPLIT_QKV:
        return ".".join(parts[:-1] + ["qkv"]), SPLIT_QKV[parts[-1]]
    if name.endswith(".attention.to_out.0"):
        return name[: -len("to_out.0")] + "o", None
    return name, None


def detect_layout(prefix: str, modules: list[str], kohya: bool, metadata: dict | None) -> str:
    split = any(m.rsplit(".", 1)[-1] in SPLIT_QKV or m.endswith("to_out.0") for m in modules)
    if prefix == "transformer.":
        return "diffusers/PEFT"
    if prefix in ("diffusion_model.", "model.diffusion_model.", "conditional_transformer."):
        return "ai-toolkit (kohya names)" if kohya else "ai-toolkit"
    if split:
        return "split to_q/to_k/to_v names"
    return "DiffSynth-Studio" if not kohya else "kohya (no prefix)"


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear of ``model`` by path: (out, in) in float terms (quantized ones too)."""
    shapes = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            out = module.weight.shape[0]
            shapes[path] = (out, module.weight.shape[1] * 32 // module.bits)
        elif isinstance(module, nn.Linear):
            shapes[path] = tuple(module.weight.shape)
    return shapes


def match(
    lora: LoRAFile,
    shapes: dict[str, tuple[int, int]],
    allow_partial: bool = False,
    diffs: bool = False,
) -> list[str]:
    """Check every delta against the model's linears: returns the unmatched module paths
    (an error unless ``allow_partial``); a shape mismatch is always an error naming both.
    Full differences (``.diff``/``.diff_b``) are refused unless ``diffs`` (the caller checks
    them: ``ideogram4_mlx.uncond_delta``)."""
    if lora.text_encoder_keys:
        example = lora.text_encoder_keys[0]
        raise LoRAError(
            f"{lora.name} has {len(lora.text_encoder_keys)} text-encoder keys (e.g. {example}): "
            "LoRAs on the Qwen3-VL text encoder are not supported; use a DiT-only LoRA"
        )
    if lora.diffs and not diffs:
        key = next(iter(lora.diff_sources.values()))
        raise LoRAError(
            f"{lora.name}: key {key} is a full difference (.diff/.diff_b), which a LoRA here "
            "cannot carry; only plain LoRA (A/B) is supported. An unconditional delta "
            "(`convert --uncond-as-lora`, ostris' unconditional LoRA) is loaded as one"
        )
    unmatched = []
    for target, deltas in lora.deltas.items():
        if target not in shapes:
            unmatched.append(target)
            continue
        out, inp = shapes[target]
        for d in deltas:
            rows = out // 3 if d.third is not None else out
            if d.down.shape[1] != inp or d.up.shape[0] != rows:
                part = " per q/k/v third" if d.third is not None else ""
                raise LoRAError(
                    f"{lora.name}: {d.source} gives a ({d.up.shape[0]}, {d.down.shape[1]}) "
                    f"update, but {target} is ({rows}, {inp}){part}: a LoRA for another model "
                    "or size"
                )
    if unmatched and not allow_partial:
        shown = ", ".join(unmatched[:3])
        raise LoRAError(
            f"{lora.name}: {len(unmatched)} of {len(lora.deltas)} LoRA modules match no layer "
            f"(e.g. {shown}); it is for another model or layout. --lora-allow-partial "
            "(allow_partial=True) applies the rest"
        )
    return unmatched


class Adapters:
    """The LoRA deltas on one linear with their current scales (not MLX parameters: loading,
    streaming and ``parameters()`` never see them)."""

    def __init__(self, out_features: int):
        self.out_features = out_features
        self.items: list[tuple[str, Delta, float]] = []  # (lora name, delta, user scale)

    def term(self, x: mx.array) -> mx.array | None:
        """The sum of the active updates (None when none is); q/k/v thirds are summed per
        third and joined once (padding each to the full width costs ~2x on CPU)."""
        full, thirds = None, [None, None, None]
        for _, d, scale in self.items:
            s = scale * d.alpha_scale
            if s == 0:
                continue
            t = (x @ d.down.T) @ d.up.T * mx.array(s, dtype=d.up.dtype)
            if d.third is None:
                full = t if full is None else full + t
            else:
                k = d.third
                thirds[k] = t if thirds[k] is None else thirds[k] + t
        if any(t is not None for t in thirds):
            rows = self.out_features // 3
            like = next(t for t in thirds if t is not None)
            zeros = mx.zeros((*like.shape[:-1], rows), dtype=like.dtype)
            joined = mx.concatenate([zeros if t is None else t for t in thirds], axis=-1)
            full = joined if full is None else full + joined
        return full


class _WithLoRA:
    lora: Adapters

    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        term = self.lora.term(x)
        return y if term is None else y + term.astype(y.dtype)


class LoRALinear(_WithLoRA, nn.Linear):
    """``nn.Linear`` plus its :class:`Adapters` (same parameters, same names)."""


class LoRAQuantizedLinear(_WithLoRA, nn.QuantizedLinear):
    """``nn.QuantizedLinear`` plus its :class:`Adapters` (same parameters, same names)."""


def apply_loras(model: nn.Module, loras: list[tuple[LoRAFile, float]]) -> None:
    """Add each ``(lora, scale)`` unfused to ``model`` (checked with :func:`match` first), in
    each layer's compute dtype: the term ``(x @ down.T) @ up.T * scale`` is added to the base
    output (as peft does)."""
    for lora, scale in loras:
        attach(model, lora, scale, lora.name)


def attach(model: nn.Module, lora: LoRAFile, scale: float, name: str) -> list[Adapters]:
    """:func:`apply_loras` for one LoRA under ``name`` (what :func:`set_scale` finds it by);
    returns the adapters it was added to."""
    modules = dict(model.named_modules())
    # Low-memory streaming leaves a block's weights empty between passes: sizes come from the
    # deltas (checked by match()) and the dtype from the model, never from those arrays.
    model_dtype = getattr(model, "dtype", None)
    touched = []
    for target, deltas in lora.deltas.items():
        module = modules.get(target)
        if module is None:
            continue  # unmatched, allowed by match()
        if not isinstance(module, _WithLoRA):
            first = deltas[0]
            module.lora = Adapters(first.up.shape[0] * (1 if first.third is None else 3))
            cls = LoRAQuantizedLinear if isinstance(module, nn.QuantizedLinear) else LoRALinear
            module.__class__ = cls
        # the base layer's compute dtype (a quantized layer's scales carry it)
        dtype = model_dtype or getattr(module, "scales", module.weight).dtype
        for d in deltas:
            cast = replace(d, down=d.down.astype(dtype), up=d.up.astype(dtype))
            module.lora.items.append((name, cast, float(scale)))
        touched.append(module.lora)
    return touched


def set_scale(model: nn.Module, name: str, scale: float) -> int:
    """Change the scale of the LoRA ``name`` everywhere in ``model``; the number of deltas."""
    count = 0
    for _, module in model.named_modules():
        if isinstance(module, _WithLoRA):
            items = module.lora.items
            for i, (n, d, _) in enumerate(items):
                if n == name:
                    items[i] = (n, d, float(scale))
                    count += 1
    return count


def fused_weight(weight: mx.array, deltas: list[tuple[Delta, float]]) -> mx.array:
    """``weight + sum(scale * up @ down)`` in fp32 (row thirds for q/k/v), one rounding back."""
    w = np.array(weight.astype(mx.float32))
    rows = w.shape[0] // 3
    for d, scale in deltas:
        update = (scale * d.alpha_scale) * (np.array(d.up) @ np.array(d.down))
        if d.third is None:
            w += update
        else:
            w[d.third * rows : (d.third + 1) * rows] += update
    return mx.array(w).astype(weight.dtype)


def fuse_loras(model: nn.Module, loras: list[tuple[LoRAFile, float]]) -> None:
    """Merge each ``(lora, scale)`` into ``model``'s float linears (quantized ones refuse)."""
    modules = dict(model.named_modules())
    pending: dict[str, list[tuple[Delta, float]]] = {}
    for lora, scale in loras:
        for target, deltas in lora.deltas.items():
            if target in modules:
                pending.setdefault(target, []).extend((d, float(scale)) for d in deltas)
    for target, deltas in pending.items():
        module = modules[target]
        if isinstance(module, nn.QuantizedLinear):
            raise LoRAError(
                f"{target} is quantized: a LoRA cannot be fused into it; use it unfused (the "
                "default) or bake it in with `ideo4-mlx convert --lora`"
            )
        module.weight = fused_weight(module.weight, deltas)


def lora_parameters(model: nn.Module) -> int:
    """How many LoRA values ``model`` carries unfused."""
    return sum(
        d.down.size + d.up.size
        for _, module in model.named_modules()
        if isinstance(module, _WithLoRA)
        for _, d, _ in module.lora.items
    )

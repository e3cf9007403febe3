"""How to load and run the models: the one definition of the load settings.

:class:`PipelineOptions` is the load side's mirror of ``GenerationRequest``: ``load()``, the
commands (one click decorator, ``cli/options.py``), the server, the PNG metadata and replay all
map onto it. Values are type-checked and normalised as it is made; :meth:`validate` checks
ranges and combinations before anything loads.
"""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import mlx.core as mx

from ideogram4_mlx.dit_file import is_full_dit_file
from ideogram4_mlx.dtypes import DTYPES, dtype_name, parse_dtype
from ideogram4_mlx.environment import default_dtype
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.hub import DEFAULT_REPO, dit_folder
from ideogram4_mlx.lora import LoRAError
from ideogram4_mlx.lora_spec import LoRASpec, parse_lora_option, replay_loras
from ideogram4_mlx.magic.options import MagicOptions
from ideogram4_mlx.memory import check_limit
from ideogram4_mlx.request import check_type, is_kind
from ideogram4_mlx.weights import fingerprint

# The options an image's metadata stores: what decides its pixels besides the request (the
# pipeline adds the quantization and the LoRA files' fingerprints, see Ideogram4Pipeline).
# Images made before --transformer have no "transformer", before --uncond no "uncond": only
# REQUIRED must be there.
STORED = ("model", "revision", "dtype", "transformer", "uncond")
REQUIRED = ("model", "revision", "dtype")
# Stored values an older image may lack, and what it was made with then.
STORED_DEFAULTS = {"uncond": "checkpoint"}
# What runs the unconditional pass (``PipelineOptions.uncond``). "self" is DiffSynth-Studio's
# fallback (diffsynth/pipelines/ideogram4.py, Ideogram4Pipeline.__call__: `self.dit_uncond if
# self.dit_uncond is not None else self.dit` on the negative inputs, image tokens only with zero
# text features); it guides with one constant cfg_scale, we with the schedule's weight per step.
UNCOND_SOURCES = {
    "checkpoint": "the checkpoint's unconditional_transformer/ (exact), or the "
    "unconditional_delta.safetensors `convert --uncond-as-lora` left in its place",
    "self": "the conditional DiT on image tokens only (one DiT in memory; an approximation)",
}
# Distilled conditional DiTs whose publishers say they run without CFG (one branch): with
# --transformer they get guidance 1 on every step unless a schedule is given. Sources: the model
# cards, https://huggingface.co/fal/ideogram-v4-instant ("8 steps. One transformer. No runtime
# CFG.") and https://huggingface.co/fal/ideogram-v4-fast (tags "20-step", "no-cfg").
SINGLE_BRANCH_REPOS = ("fal/ideogram-v4-instant", "fal/ideogram-v4-fast")
# Any other ``uncond`` is a delta (uncond_delta.py): a file, a converted folder or a Hub repo.
DELTA_WHAT = "a delta: a file, a folder from `convert --uncond-as-lora`, or a Hub repo"


@dataclass(frozen=True)
class PipelineOptions:
    """Which checkpoint, and how to run it.

    ``model``: a local checkpoint folder or a Hugging Face repo id (``revision``: its branch,
    tag or commit). ``dtype``: an MLX dtype or its name; None (the default) is the backend's
    choice, resolved by :meth:`validate` (float32 on MLX's CPU backend, where bf16 and quantized
    matmuls are 10-50x slower; bfloat16 on Metal and CUDA: ``environment.default_dtype``), so
    loaded options and an image's metadata hold the dtype used. ``memory_limit``: GB the
    denoise stage may use (as many DiT blocks resident as fit, the rest streamed from disk each
    pass, the same image); 0 streams every block (the least memory, ``--low-memory``); None
    takes the machine's. ``keep_in_memory``: keep every model loaded between images (None: when
    their weights fit the budget). ``loras``: :class:`LoRASpec` or ``"FILE[:SCALE]"`` strings,
    for the conditional DiT unless their target is ``uncond``; ``fuse_lora`` merges them into
    the float weights at load; ``lora_allow_partial`` applies a LoRA some of whose modules match
    no layer.
    ``magic_head``/``magic_model``: the magic prompt's lm_head, or another mlx-lm chat model;
    ``magic_options``: its expansion settings (:class:`MagicOptions`, or a dict of them).
    ``distributed``: use the ranks ``mlx.launch -n 2`` started (CFG-parallel for one image).
    ``transformer``: another conditional DiT in place of the checkpoint's (a distilled one,
    say): a folder holding its ``config.json`` and weights (raw or converted, as a checkpoint's
    ``transformer/``), a checkpoint folder whose ``transformer/`` is taken, or a repo id of
    either (``owner/name[@REVISION]``), or one DiT file (``.gguf`` or ``.safetensors``, read
    with the checkpoint's config: ``dit_file``); the unconditional DiT, text encoder and VAE
    stay the checkpoint's (``hub.resolve_transformer``).
    ``uncond``: what runs the unconditional pass (``UNCOND_SOURCES``): ``"checkpoint"``, its
    ``unconditional_transformer/``; ``"self"``, the conditional DiT's weights on the
    unconditional branch's inputs (image tokens only, no text), as DiffSynth-Studio runs
    without that folder: one DiT in memory, an approximation of the image; anything else, a
    delta (``uncond_delta.py``: a file, a folder from ``convert --uncond-as-lora`` or a Hub repo
    such as ``ostris/ideogram_4_unconditional_lora``) that the conditional DiT's weights run the
    unconditional pass with: one DiT in memory, exact for a ``full`` delta; or a whole
    unconditional DiT in one file (:attr:`uncond_file`: ``.gguf``, or ``.safetensors`` with the
    DiT's own tensors), read with the checkpoint's config. Any way, a schedule whose every
    guidance is 1 never loads it.
    ``single_branch``: the conditional DiT was distilled to run without CFG, so a request that
    gives no guidance schedule runs guidance 1 on every step (:meth:`shape_request`); None: True
    for a ``transformer`` from ``SINGLE_BRANCH_REPOS``, else False.
    """

    model: str | Path = DEFAULT_REPO
    revision: str | None = None
    dtype: mx.Dtype | None = None
    memory_limit: float | None = None
    keep_in_memory: bool | None = None
    loras: tuple[LoRASpec, ...] = ()
    fuse_lora: bool = False
    lora_allow_partial: bool = False
    magic_head: str | Path | None = None
    magic_model: str | Path | None = None
    magic_options: MagicOptions = field(default_factory=MagicOptions)
    distributed: bool = False
    transformer: str | Path | None = None
    uncond: str = "checkpoint"
    single_branch: bool | None = None
    # Set by validate() on the options it returns; replace() makes unvalidated options.
    validated: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if isinstance(self.dtype, str):
            set_("dtype", parse_dtype(self.dtype))
        if self.dtype is not None and (
            not isinstance(self.dtype, mx.Dtype) or self.dtype not in DTYPES.values()
        ):
            raise InputError(
                f"dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}"
            )
        if isinstance(self.loras, (str, LoRASpec)):
            raise LoRAError("loras must be a list of LoRAs, not one: wrap it in [...]")
        set_("loras", tuple(parse_lora_option(s) if isinstance(s, str) else s for s in self.loras))
        if not all(isinstance(s, LoRASpec) for s in self.loras):
            raise LoRAError(f"loras {reprlib.repr(self.loras)} must be LoRASpecs or FILE[:SCALE]")
        if isinstance(self.magic_options, Mapping):
            set_("magic_options", MagicOptions(**self.magic_options))
        for name, kind in TYPES.items():
            if not isinstance(getattr(self, name), kind) or (
                isinstance(getattr(self, name), bool) and bool not in _kinds(kind)
            ):
                raise InputError(f"{name} {reprlib.repr(getattr(self, name))} must be {WHAT[name]}")

    @classmethod
    def from_keywords(cls, base: PipelineOptions | None = None, **keywords) -> PipelineOptions:
        """``base`` (the defaults when None) with ``keywords`` replacing its fields. The
        commands' names are taken too (``ALIASES``): ``low_memory=True`` is ``memory_limit=0``;
        ``lora`` is ``loras`` (one ``FILE[:SCALE]`` or a list); ``lora_uncond`` adds LoRAs for
        the unconditional DiT; ``max_tokens``, ``temperature``, ``top_p``, ``keep_bboxes``,
        ``system_prompt`` and ``grammar_limits`` set those of ``magic_options``. A setting given
        under both its names is an ``InputError``; an unknown name a ``TypeError``."""
        keywords = dict(keywords)
        unknown = sorted(set(keywords) - set(OPTIONS) - set(ALIASES))
        if unknown:
            valid = ", ".join([*OPTIONS, *ALIASES])
            raise TypeError(f"unknown load option(s) {unknown}; valid: {valid}")
        if keywords.pop("low_memory", False):
            if keywords.get("memory_limit") is not None:
                raise InputError(
                    "low_memory streams every DiT block, whatever the memory_limit: give one "
                    "of them"
                )
            keywords["memory_limit"] = 0
        if "lora" in keywords:
            _not_both("lora", "loras", keywords)
            keywords["loras"] = _listed(keywords.pop("lora"))
        if "lora_uncond" in keywords:
            uncond = [_uncond(s) for s in _listed(keywords.pop("lora_uncond"))]
            given = keywords.get("loras", () if base is None else base.loras)
            keywords["loras"] = [*_listed(given), *uncond]
        magic = {k: keywords.pop(k) for k in MAGIC_FIELDS if k in keywords}
        if magic:
            if "magic_options" in keywords:
                raise InputError(f"give magic_options or its fields ({', '.join(magic)}), not both")
            current = (base or cls()).magic_options
            keywords["magic_options"] = replace(current, **magic)
        return cls(**keywords) if base is None else replace(base, **keywords)

    @property
    def is_single_branch(self) -> bool:
        """``single_branch``, or whether ``transformer`` is a known single-branch repo."""
        if self.single_branch is not None:
            return self.single_branch
        source = None if self.transformer is None else str(self.transformer).partition("@")[0]
        return source in SINGLE_BRANCH_REPOS

    def shape_request(self, request):
        """``request`` as these options run it: a single-branch DiT gets guidance 1 on every
        step when the request gives no schedule (stored as such in the image's metadata)."""
        if self.is_single_branch and request.guidance_schedule is None:
            return replace(request, guidance_schedule=(1.0,))
        return request

    @property
    def uncond_delta(self) -> str | None:
        """The delta source ``uncond`` names, or None for ``checkpoint``, ``self`` and a whole
        DiT file (:attr:`uncond_file`)."""
        if self.uncond in UNCOND_SOURCES or self.uncond_file is not None:
            return None
        return self.uncond

    @property
    def uncond_file(self) -> str | None:
        """``uncond`` when it names a whole unconditional DiT in one file (a ``.gguf``, or a
        ``.safetensors`` holding the DiT's own tensors, not a delta's: ``dit_file``)."""
        named = self.uncond not in UNCOND_SOURCES and self.uncond.strip()
        return self.uncond if named and is_full_dit_file(self.uncond) else None

    @property
    def low_memory(self) -> bool:
        """Every DiT block streamed (``memory_limit`` 0)."""
        return is_kind(self.memory_limit, numbers.Real) and self.memory_limit == 0

    def validate(self) -> PipelineOptions:
        """Ranges and combinations, checked before anything loads (``ValueError`` or
        ``LoRAError`` naming the option and the fix); the options with the magic prompt's
        system prompt file read and an automatic ``dtype`` resolved for this backend. Validated
        options are returned as they are."""
        if self.validated:
            return self
        if self.memory_limit is not None and not self.low_memory:
            check_limit(self.memory_limit, "GB")  # its type too
        if self.fuse_lora and self.low_memory:
            raise LoRAError(
                "--fuse-lora with --low-memory: the streamed blocks are read from disk on every "
                "pass; use the LoRA unfused (the default) or bake it in with `ideo4-mlx convert "
                "--lora`"
            )
        if not self.uncond.strip():
            valid = "; ".join(f"{k!r}: {v}" for k, v in UNCOND_SOURCES.items())
            raise InputError(f"uncond is empty; use {valid}; or {DELTA_WHAT}")
        if self.uncond_delta is not None:
            clash = [
                flag
                for flag, on in (
                    ("--fuse-lora", self.fuse_lora),  # fused LoRAs would reach the delta's pass
                    ("--low-memory", self.low_memory),  # the delta needs the DiT resident
                    ("--distributed", self.distributed),  # one DiT runs both passes
                )
                if on
            ]
            if clash:
                raise InputError(
                    f"--uncond {self.uncond} (a delta on the conditional DiT) cannot be combined "
                    f"with {', '.join(clash)}: drop it, or use --uncond checkpoint"
                )
        if self.uncond == "self" and any(s.target == "uncond" for s in self.loras):
            raise LoRAError(
                "--lora-uncond with --uncond self: there is no unconditional DiT, the "
                "conditional one (with its --lora LoRAs) runs both passes; drop --lora-uncond "
                "or use --uncond checkpoint"
            )
        options = replace(
            self, dtype=resolve_dtype(self.dtype), magic_options=self.magic_options.validate()
        )
        object.__setattr__(options, "validated", True)
        return options

    def to_metadata(self) -> dict:
        """What an image's metadata stores of these options (``STORED``): the dtype resolved,
        so a replay uses the same one on any backend; ``transformer`` only when one is
        swapped in (images without it replay with the checkpoint's DiT)."""
        stored = {
            "model": str(self.model),
            "revision": self.revision,
            "dtype": dtype_name(resolve_dtype(self.dtype)),
            "uncond": self.uncond,
        }
        if self.uncond_file is not None:  # absolute, so replay works from any folder
            stored["uncond"] = str(Path(self.uncond_file).expanduser().resolve())
        if self.transformer is not None:  # the pipeline adds its fingerprint (settings())
            stored["transformer"] = {"source": str(self.transformer)}
        return stored

    @classmethod
    def from_metadata(
        cls,
        metadata: Mapping,
        base: PipelineOptions | None = None,
        overrides: Mapping | None = None,
    ) -> PipelineOptions:
        """The options an image was made with: ``base`` (the command line's; its ``loras`` are
        files given again) with the stored model, revision, dtype and uncond unless
        ``overrides`` gives them (a new model drops the stored revision), the conditional DiT
        swapped in (``transformer``: the stored one, or the override's, checked against the
        stored fingerprint when it is a folder), and the stored LoRAs found again by SHA-256
        (:func:`~ideogram4_mlx.lora_spec.replay_loras`), fused if they were. An image without
        ``uncond`` used the checkpoint's (``STORED_DEFAULTS``)."""
        base = cls() if base is None else base
        overrides = overrides or {}
        metadata = {**STORED_DEFAULTS, **metadata}
        missing = [k for k in REQUIRED if k not in metadata]
        if missing:
            raise InputError(f"the metadata has no {', '.join(missing)}: it cannot be replayed")
        check_type("model", metadata["model"], str)
        check_type("revision", metadata["revision"], (str, type(None)))
        check_type("dtype", metadata["dtype"], str)
        check_type("uncond", metadata["uncond"], str)
        stored = {k: metadata[k] for k in (*REQUIRED, "uncond")}
        stored["transformer"] = replay_transformer(
            metadata.get("transformer"), overrides.get("transformer")
        )
        if "uncond" not in overrides:
            replay_uncond_file(metadata.get("uncond_dit"), stored["uncond"])
        if "model" in overrides:
            stored["revision"] = None
        stored.update({k: v for k, v in overrides.items() if k in STORED})
        records = metadata.get("loras")
        fused = bool(records) and all(r.get("fused") is True for r in records)
        return replace(
            base,
            **stored,
            loras=tuple(replay_loras(records, list(base.loras))),
            fuse_lora=base.fuse_lora or fused,
        )


def replay_transformer(record, override: str | Path | None) -> str | Path | None:
    """The conditional DiT to replay an image with: ``override`` (``--transformer``) or the
    stored ``record``'s source; a folder is checked against the stored fingerprint, so a moved
    or replaced DiT is found or refused, never silently used."""
    check_type("transformer", record, (dict, type(None)))
    if record is not None:
        check_type("transformer source", record.get("source"), str)
    source = override if override is not None else None if record is None else record["source"]
    expected = None if record is None else record.get("fingerprint")
    if source is None or expected is None or _is_repo_id(source):
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(
            f"the image was made with the conditional DiT at {source}, which is not there: "
            "give --transformer with where it is now (transformer= in Python)"
        )
    if fingerprint(path if path.is_file() else dit_folder(path, str(source))) != expected:
        raise InputError(
            f"--transformer {source} is not the conditional DiT the image was made with (its "
            f"fingerprint differs from the stored {expected[:12]}...): give that DiT's folder "
            "or file"
        )
    return source


def replay_uncond_file(record, source: str) -> None:
    """An image made with ``--uncond FILE`` (``record``: its ``uncond_dit`` metadata) replays
    with that file only: there, and with the stored fingerprint."""
    check_type("uncond_dit", record, (dict, type(None)))
    if record is None or not isinstance(record.get("fingerprint"), str):
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(
            f"the image was made with the unconditional DiT file {source}, which is not there: "
            "give --uncond with where it is now (uncond= in Python)"
        )
    if fingerprint(path) != record["fingerprint"]:
        raise InputError(
            f"--uncond {source} is not the unconditional DiT the image was made with (its "
            f"fingerprint differs from the stored {record['fingerprint'][:12]}...): give that file"
        )


def _is_repo_id(source: str | Path) -> bool:
    """A repo id pinned at its commit (``owner/name@REVISION``) or not: no folder of that name."""
    return not Path(source).expanduser().exists() and str(source).split("@")[0].count("/") == 1


def resolve_dtype(dtype: mx.Dtype | None) -> mx.Dtype:
    """``dtype``, or the backend's choice when None (``environment.default_dtype``)."""
    return default_dtype()[0] if dtype is None else dtype


def _not_both(alias: str, name: str, keywords: Mapping) -> None:
    if alias in keywords and name in keywords:
        raise InputError(f"{alias} is another name for {name}: give one of them")


def _uncond(spec: str | LoRASpec) -> LoRASpec:
    if isinstance(spec, str):
        return parse_lora_option(spec, "uncond")
    return replace(spec, target="uncond")


def _listed(value) -> list:
    """One LoRA (a string or spec) as a list of one; a list or tuple as a list."""
    return [value] if isinstance(value, (str, LoRASpec)) else list(value)


def _kinds(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


OPTIONAL_PATH = (str, Path, type(None))
TYPES = {
    "model": (str, Path),
    "revision": (str, type(None)),
    "keep_in_memory": (bool, type(None)),
    "fuse_lora": bool,
    "lora_allow_partial": bool,
    "magic_head": OPTIONAL_PATH,
    "magic_model": OPTIONAL_PATH,
    "magic_options": MagicOptions,
    "distributed": bool,
    "transformer": OPTIONAL_PATH,
    "single_branch": (bool, type(None)),
    "uncond": str,
}
WHAT = {
    "model": "a checkpoint folder or a repo id",
    "revision": "a branch, tag or commit, or None",
    "keep_in_memory": "True, False or None (when the weights fit)",
    "fuse_lora": "True or False",
    "lora_allow_partial": "True or False",
    "magic_head": "a folder or repo id, or None",
    "magic_model": "a folder or repo id, or None",
    "magic_options": "MagicOptions or a dict of its fields",
    "distributed": "True or False",
    "transformer": "a DiT or checkpoint folder or a repo id, or None",
    "single_branch": "True, False or None (known from the transformer)",
    "uncond": f"one of {', '.join(UNCOND_SOURCES)}, or {DELTA_WHAT}",
}
OPTIONS = tuple(f.name for f in fields(PipelineOptions) if f.init)
MAGIC_FIELDS = tuple(f.name for f in fields(MagicOptions))
# The commands' names for load settings that are no field here (from_keywords takes them).
ALIASES = ("low_memory", "lora", "lora_uncond", *MAGIC_FIELDS)

"""Text-to-image: encode the prompt, denoise with two DiTs, decode with the VAE
(MODEL_NOTES#sampler, #numerics).

Each stage is visible and timed: ``encode`` (Qwen3-VL taps), ``denoise`` (Euler + CFG over the
conditional and unconditional DiTs), ``decode`` (FLUX.2 VAE). Unless ``keep_in_memory`` is set,
the text encoder is freed before denoising and the DiTs before decoding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ideogram4_mlx import dit_file
from ideogram4_mlx.distributed import CFGGroup
from ideogram4_mlx.environment import describe, warn_if_slow
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.generation import (  # noqa: F401 (Step, NonFiniteError: public names here too)
    Components,
    DiTs,
    Generation,
    GenerationResult,
    NonFiniteError,
    Report,
    Stage,
    Step,
)
from ideogram4_mlx.hub import DEFAULT_REPO, resolve_file, resolve_model, resolve_transformer
from ideogram4_mlx.lora import (
    LoRAError,
    LoRAFile,
    apply_loras,
    fuse_loras,
    linear_shapes,
    match,
    read_lora,
    set_scale,
)
from ideogram4_mlx.lora_spec import TARGETS, LoRASpec, parse_lora_option
from ideogram4_mlx.memory import MemoryBudget, check_limit
from ideogram4_mlx.pipeline_options import PipelineOptions
from ideogram4_mlx.prompt import MAX_TEXT_TOKENS, PromptEncoder
from ideogram4_mlx.request import (
    GenerationRequest,
    ResolvedRequest,
    request_from_settings,
)
from ideogram4_mlx.sampler import skips_uncond, uses_uncond
from ideogram4_mlx.text_retry import generate_checked, text_check_from
from ideogram4_mlx.transformer import DIT_COMPONENTS, Ideogram4Transformer
from ideogram4_mlx.uncond_delta import DELTA_FILE, DeltaDiT, read_uncond_delta
from ideogram4_mlx.vae import Flux2VAE
from ideogram4_mlx.weights import fingerprint

# The sequence length dits() plans for when none is given: 1024^2 with the longest caption.
PLAN_TOKENS = (1024 // 16) ** 2 + MAX_TEXT_TOKENS


class Ideogram4Pipeline:
    """Loads components on demand from one checkpoint folder; see :func:`load`."""

    def __init__(
        self,
        checkpoint_dir: Path,
        options: PipelineOptions | None = None,
        transformer_dir: Path | None = None,
    ):
        """``options``: validated, their model and revision resolved (``load`` does both);
        ``transformer_dir``: the folder of ``options.transformer`` (resolved here if None)."""
        self.checkpoint_dir = Path(checkpoint_dir)
        if options is None:
            options = PipelineOptions(str(self.checkpoint_dir)).validate()
        self.options = options
        if transformer_dir is None and options.transformer is not None:
            transformer_dir = resolve_transformer(options.transformer)[0]
        # The conditional DiT swapped in, if any: a folder, or a file (a dit_file.DiTFile).
        self.transformer_dir = dit_file.dit_source(transformer_dir, self.checkpoint_dir)
        # --uncond FILE: a whole unconditional DiT in one file (dit_file), read with the config
        # of the checkpoint's unconditional_transformer/ (or transformer/).
        uncond = DIT_COMPONENTS[1][0]
        self.uncond_file = dit_file.dit_source(options.uncond_file, self.checkpoint_dir, uncond)
        self._transformer_fingerprint: str | None = None
        # The unconditional DiT as a delta on the conditional one (uncond_delta.py): the one
        # options.uncond names, or the file `convert --uncond-as-lora` left in the checkpoint.
        self.delta_source = options.uncond_delta
        uncond_dir = self.checkpoint_dir / DIT_COMPONENTS[1][0]
        in_place = self.checkpoint_dir / DELTA_FILE
        if options.uncond == "checkpoint" and not uncond_dir.is_dir() and in_place.is_file():
            self.delta_source = str(self.checkpoint_dir)
        self.uncond_delta: LoRAFile | None = None  # read by load(), before any weights load
        self._delta_dit: DeltaDiT | None = None
        self.dtype = options.dtype
        self.low_memory = options.low_memory
        limit = None if options.memory_limit in (None, 0) else check_limit(options.memory_limit)
        # The memory policy (ideogram4_mlx.memory); memory_limit None: the machine's budget.
        self.budget = MemoryBudget(
            self.checkpoint_dir, self.dtype, limit, self.low_memory, self.budget_dits()
        )
        self.memory_limit = self.budget.limit_bytes  # bytes the denoise stage may use
        self.resident_blocks: tuple[int, int] | None = None  # the loaded DiTs' plan
        self.model_id = str(options.model)
        self.revision = options.revision
        keep_in_memory = options.keep_in_memory
        if keep_in_memory is None:
            keep_in_memory = self.budget.keep_models()
        self.keep_in_memory = keep_in_memory
        self._prompt_encoder: PromptEncoder | None = None
        self._dits: DiTs | None = None
        self._vae: Flux2VAE | None = None
        self._magic: tuple | None = None  # (mlx-lm model on the text encoder, tokenizer)
        self._describer = None  # describe.model.DescribeModel, once loaded
        self.loras: list[tuple[LoRASpec, LoRAFile]] = []  # see add_lora
        # CFG-parallel ranks: joined here, so a launch error comes before anything loads.
        self.cfg = CFGGroup.start(self.checkpoint_dir) if options.distributed else None

    @property
    def fuse_lora(self) -> bool:
        return self.options.fuse_lora

    def dit_components(self) -> tuple[tuple[str, bool] | None, ...]:
        """(folder, text_input) of the (cond, uncond) DiTs as they load. With ``uncond``
        "self" the unconditional pass runs the conditional DiT: one process holds it once
        (None), a CFG-parallel rank 1 its own copy (with the text projection, so the
        conditional LoRAs apply unchanged)."""
        if self.options.uncond == "self" or self.delta_source is not None:
            return DIT_COMPONENTS[0], DIT_COMPONENTS[0] if self.options.distributed else None
        return DIT_COMPONENTS

    def budget_dits(self) -> tuple[tuple[Path, bool] | None, ...]:
        """:meth:`dit_components` as the memory budget reads them: each DiT's folder (the
        swapped-in conditional DiT's, see :meth:`dit_dir`) and whether it reads text."""
        return tuple(
            None if dit is None else (self.dit_dir(dit[0]), dit[1]) for dit in self.dit_components()
        )

    def check_uncond(self, guidance: tuple[float, ...] | None = None) -> None:
        """``InputError`` before any weights load when a step of ``guidance`` (None: any
        step) calls the unconditional DiT and the checkpoint has none."""
        name = DIT_COMPONENTS[1][0]
        needed = guidance is None or uses_uncond(guidance)
        if not needed or self.options.uncond != "checkpoint" or self.delta_source is not None:
            return
        if not (self.checkpoint_dir / name / "config.json").is_file():
            who = "the unconditional pass"
            if guidance is not None:
                step = next(i for i, g in enumerate(guidance) if not skips_uncond(g))
                who = f"step {step + 1}'s guidance {guidance[step]:g}"
            raise InputError(
                f"{self.checkpoint_dir} has no {name}/, which {who} needs: use a guidance "
                "schedule of 1 (--guidance-schedule 1), --uncond self (the conditional DiT for "
                "both passes, an approximation) or a full checkpoint"
            )

    # -- components -------------------------------------------------------------------------

    def dit_dir(self, name: str) -> Path:
        """The folder of DiT ``name`` (``DIT_COMPONENTS``): the checkpoint's, or for
        ``transformer`` the one ``--transformer`` swapped in."""
        if name == "transformer" and self.transformer_dir is not None:
            return self.transformer_dir
        if name == DIT_COMPONENTS[1][0] and self.uncond_file is not None:
            return self.uncond_file
        return self.checkpoint_dir / name

    def prompt_encoder(self) -> PromptEncoder:
        """The tokenizer and prompt cache; the text encoder itself loads in :meth:`encode`."""
        if self._prompt_encoder is None:
            self._prompt_encoder = PromptEncoder.from_pretrained(
                self.checkpoint_dir, dtype=self.dtype, load_model=False
            )
        return self._prompt_encoder

    def encode(self, prompt: str) -> mx.array:
        """Text features (1, T, 13*D) fp32; the text encoder loads only for an uncached prompt."""
        encoder = self.prompt_encoder()
        if not encoder.is_cached(prompt):
            encoder.load_model()
        features = encoder.encode(prompt).features
        mx.eval(features)
        return features

    def magic_model(self) -> tuple:
        """(mlx-lm causal LM, tokenizer) for the magic prompt: the loaded text encoder's own
        arrays plus the prompt-enhancer lm_head (1.2 GB in bf16), so expanding and encoding
        share one 8B body."""
        # mlx-lm imports transformers' auto classes, which import torch when it is installed:
        # only the magic prompt pays for that, never `import ideogram4_mlx`.
        from ideogram4_mlx.magic.model import (
            from_text_encoder,
            load_chat_model,
            load_head,
            magic_tokenizer,
            resolve_head,
        )

        if self.options.magic_model is not None:
            if self._magic is None:
                self._magic = load_chat_model(self.options.magic_model)
            return self._magic
        encoder = self.prompt_encoder()
        encoder.load_model()
        if self._magic is None:
            head_dir = resolve_head(self.options.magic_head, self.checkpoint_dir)
            lm_head = load_head(head_dir, encoder.model.config, self.dtype)
            text_dir = self.checkpoint_dir / "text_encoder"
            lm = from_text_encoder(encoder.model, text_dir, lm_head)
            self._magic = (lm, magic_tokenizer(self.checkpoint_dir / "tokenizer"))
        return self._magic

    def expand(
        self, idea: str, width: int = 1024, height: int = 1024, seed: int | None = None, **options
    ) -> str:
        """A JSON caption for a plain ``idea`` (magic prompt), verifier-clean. The pipeline
        options' ``magic_options`` apply; ``options`` override them, as
        :func:`ideogram4_mlx.magic.expand.expand`'s (temperature, top_p, max_tokens,
        keep_bboxes, system_prompt, grammar_limits, on_text)."""
        from ideogram4_mlx.magic.expand import expand  # mlx-lm: see magic_model

        model, tokenizer = self.magic_model()
        settings = {**self.options.magic_options.as_kwargs(), **options}
        return expand(model, tokenizer, idea, width, height, seed, **settings)

    def describe(self, image, idea: str | None = None, seed: int | None = None, **options) -> str:
        """A verifier-clean JSON caption of ``image``, steered by ``idea``; ``options`` as
        ``describe.describe.describe``'s (default: the magic options' bboxes, tokens, limits)."""
        from ideogram4_mlx.describe.describe import run  # mlx-lm: see magic_model
        from ideogram4_mlx.describe.model import load_describe_model
        from ideogram4_mlx.describe.options import prepare
        from ideogram4_mlx.magic.model import resolve_head

        on_text, m = options.pop("on_text", None), self.options.magic_options
        defaults = {k: getattr(m, k) for k in ("keep_bboxes", "max_tokens", "grammar_limits")}
        task = prepare(image, idea, seed, **{**defaults, **options})  # greedy: not m's sampling
        if self._describer is None:  # after the checks: bad input loads nothing
            head_dir = resolve_head(self.options.magic_head, self.checkpoint_dir)
            self._describer = load_describe_model(self.checkpoint_dir, self.dtype, head_dir)
        return run(self._describer, task, on_text)

    def plan(self, tokens: int, held: tuple[int, ...] = (0, 1)) -> tuple[int, int]:
        """Resident blocks of (cond, uncond) for a ``tokens``-long sequence, counting only the
        DiTs numbered ``held``: all when the budget holds them, none with ``low_memory``; sets
        MLX's cache limit to what the plan leaves of the budget (``MemoryBudget.plan``)."""
        return self.budget.plan(tokens, held)

    def held(self, uncond: bool = True) -> tuple[int, ...]:
        """The DiTs (0: cond, 1: uncond) this process loads, ``uncond``: whether a step calls
        the unconditional DiT. A CFG-parallel rank loads its own only (rank 0: cond, rank 1:
        uncond, nothing when no step needs it); with ``uncond`` "self" one process loads the
        conditional DiT alone."""
        if self.cfg is not None:
            return (self.cfg.rank,) if self.cfg.leads or uncond else ()
        return (0, 1) if uncond and self.dit_components()[1] is not None else (0,)

    def dits(self, tokens: int = PLAN_TOKENS, uncond: bool = True) -> DiTs:
        """(cond, uncond) DiTs, as many blocks resident as the memory budget allows for
        ``tokens`` (caption + image tokens); one reloads when another sequence length changes
        its plan. ``uncond`` False (every step's guidance is 1): the unconditional DiT is not
        loaded nor counted by the plan, and comes back None. With ``uncond`` "self" the
        conditional DiT comes back for both. None for a DiT a CFG-parallel rank does not hold.
        ``InputError`` before any weights load when ``uncond`` needs a folder the checkpoint
        lacks."""
        if uncond:
            self.check_uncond()
        held = self.held(uncond)
        plan = self.plan(tokens, held)
        loaded = self._dits or (None, None)
        kept = tuple(
            m if i in held and m is not None and self.resident_blocks[i] == plan[i] else None
            for i, m in enumerate(loaded)
        )
        if any(k is not m for k, m in zip(kept, loaded, strict=True)):
            self._dits = None
            mx.clear_cache()  # the dropped DiT's buffers, before another loads
        if self.fuse_lora:  # before any weights load
            streamed = self.budget.streamed(plan, held)
            if streamed:
                raise LoRAError(
                    f"--fuse-lora needs every DiT block resident, but the memory budget "
                    f"({self.memory_limit / 1e9:.1f} GB) streams {streamed} of them: "
                    "raise --memory-limit, use the LoRA unfused (the default) or bake it "
                    "in with `ideo4-mlx convert --lora`"
                )
        self._dits = tuple(
            self._load_dit(i, plan[i]) if i in held and m is None else m for i, m in enumerate(kept)
        )
        self.resident_blocks = plan
        cond, uncond_dit = self._dits
        if uncond and self.cfg is None and self.dit_components()[1] is None:
            if self.delta_source is None:
                return cond, cond  # uncond "self": the conditional DiT runs both passes
            return cond, self.delta_dit(cond)
        return self._dits

    def delta_dit(self, cond: Ideogram4Transformer) -> DeltaDiT:
        """The unconditional DiT as ``cond`` plus the delta (made once per loaded ``cond``;
        the ``--lora-uncond`` LoRAs on its pass only)."""
        if self._delta_dit is None or self._delta_dit.dit is not cond:
            uncond_loras = [(f, s.scale) for s, f in self.loras if s.target == TARGETS[1]]
            self._delta_dit = DeltaDiT(cond, self.uncond_delta, uncond_loras=uncond_loras)
        return self._delta_dit

    def _load_dit(self, index: int, resident_blocks: int) -> Ideogram4Transformer:
        """DiT ``index`` (0: cond, 1: uncond) with its LoRAs. The unconditional branch sees
        image tokens only: its text projection is not read."""
        name, text = self.dit_components()[index]
        model = dit_file.load_dit(self.dit_dir(name), self.dtype, text, resident_blocks)
        # With uncond "self" a rank 1's copy of the conditional DiT takes the conditional LoRAs.
        target = TARGETS[0] if name == DIT_COMPONENTS[0][0] else TARGETS[index]
        chosen = [(f, s.scale) for s, f in self.loras if s.target == target]
        if chosen:
            (fuse_loras if self.fuse_lora else apply_loras)(model, chosen)
        return model

    def add_lora(self, spec: LoRASpec | str, allow_partial: bool = False) -> LoRAFile:
        """Read a LoRA (a file or ``owner/name[/file]`` on the Hub) and check it against its DiT
        before any weights load; it is applied when the DiTs load (reloaded if they are).

        Every LoRA module must match a layer with the right shape (``LoRAError`` naming the
        key otherwise); ``allow_partial`` applies the rest with a warning giving the count."""
        spec = (parse_lora_option(spec) if isinstance(spec, str) else spec).resolved()
        lora = read_lora(resolve_file(spec.source))
        if lora.name in self.lora_names():
            raise LoRAError(f"a LoRA named {lora.name} is loaded already; rename one file")
        component = DIT_COMPONENTS[TARGETS.index(spec.target)][0]
        held = isinstance(self.dit_dir(component), dit_file.DiTFile)  # --uncond FILE
        if not held and not (self.checkpoint_dir / component / "config.json").is_file():
            raise LoRAError(
                f"{spec.source}: a LoRA for the unconditional DiT, but {self.checkpoint_dir} "
                f"has no {component}/; drop --lora-uncond or use a full checkpoint"
            )
        shapes = linear_shapes(dit_file.build_dit(self.dit_dir(component)))
        unmatched = match(lora, shapes, allow_partial)
        if unmatched:
            warnings.warn(
                f"LoRA {lora.name}: {len(unmatched)} of {len(lora.deltas)} modules match no "
                f"layer and are skipped (e.g. {unmatched[0]})",
                stacklevel=2,
            )
        if self.fuse_lora and self.quantization() is not None:
            raise LoRAError(
                "--fuse-lora needs float weights, but this checkpoint is quantized: use the "
                "LoRA unfused (the default, exact) or bake it in with `ideo4-mlx convert --lora`"
            )
        self.loras.append((spec, lora))
        self._dits = None  # the next generation loads them with this LoRA
        return lora

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change a loaded LoRA's scale (its file name) without reloading: unfused LoRAs change
        in place; fused ones are merged again at the next load."""
        for i, (spec, lora) in enumerate(self.loras):
            if lora.name == name:
                self.loras[i] = (LoRASpec(spec.source, scale, spec.target).resolved(), lora)
                if self._delta_dit is not None and spec.target == TARGETS[1]:
                    self._delta_dit.set_scale(name, scale)  # on the delta's pass only
                elif self._dits is not None and not self.fuse_lora:
                    for model in self._dits:  # names are unique: only its DiT has it
                        if model is not None:
                            set_scale(model, name, scale)
                elif self.fuse_lora:
                    self._dits = None
                return
        raise LoRAError(
            f"no LoRA named {name} is loaded ({', '.join(self.lora_names()) or 'none'})"
        )

    def lora_names(self) -> list[str]:
        return [lora.name for _, lora in self.loras]

    def vae(self) -> Flux2VAE:
        if self._vae is None:
            self._vae = Flux2VAE.from_pretrained(self.checkpoint_dir / "vae", self.dtype)
        return self._vae

    def release(self, *names: str) -> None:
        """Free components ("text_encoder", "transformers", "vae") unless keep_in_memory."""
        if self.keep_in_memory:
            return
        if "text_encoder" in names and self._prompt_encoder is not None:
            self._prompt_encoder.release_model()  # the tokenizer and the feature cache stay
            self._magic = None  # it holds the text encoder's arrays (or is another model)
        if "text_encoder" in names or "describe" in names:
            self._describer = None
        if "transformers" in names:
            self._dits = None
        if "vae" in names:
            self._vae = None
        mx.clear_cache()

    def quantization(self) -> dict | None:
        """What ``ideo4-mlx convert`` recorded for the DiTs (None for a raw fp8 snapshot)."""
        return dit_file.dit_quantization(self.dit_dir("transformer"), self.dtype)

    def settings(self) -> dict:
        """What this pipeline adds to an image's metadata: model, revision, dtype, quantization,
        the conditional DiT swapped in (its source and ``weights.fingerprint``)."""
        settings = {
            **self.options.to_metadata(),
            "quantization": self.quantization(),
            "environment": describe(),
        }
        if self.transformer_dir is not None:
            if self._transformer_fingerprint is None:
                self._transformer_fingerprint = fingerprint(self.transformer_dir)
            settings["transformer"] = {
                "source": str(self.options.transformer),
                "fingerprint": self._transformer_fingerprint,
            }
        if self.uncond_file is not None:  # replay checks it (PipelineOptions.from_metadata)
            settings["uncond_dit"] = {"fingerprint": fingerprint(self.uncond_file)}
        baked = {}
        for name, _ in DIT_COMPONENTS:
            record = dit_file.dit_record(self.dit_dir(name))  # None: a file, or no folder
            if record and record.get("loras"):
                baked[name] = record["loras"]
        if baked:  # LoRAs `convert --lora` merged into the weights: part of the model
            settings["baked_loras"] = baked
        if self.loras:
            settings["loras"] = [
                {
                    "name": lora.name,
                    "sha256": lora.sha256,
                    "target": spec.target,
                    "scale": spec.scale,
                    "fused": self.fuse_lora,
                }
                for spec, lora in self.loras
            ]
        if self.uncond_delta is not None:  # what ran the unconditional pass (replay: uncond)
            delta = self.uncond_delta
            settings["uncond_delta"] = {"name": delta.name, "sha256": delta.sha256}
        return settings

    # -- generation ---------------------------------------------------------------------------

    def components(self) -> Components:
        """What a generation uses of this pipeline: the prompt encoder, the DiTs, the VAE, the
        release hook, the magic prompt, the metadata settings and the CFG-parallel group.
        Nothing loads here."""
        return Components(
            encode=self.encode,
            dits=self.dits,
            vae=self.vae,
            release=self.release,
            expand=self.expand,
            settings=self.settings,
            describe=self.describe,
            cfg=self.cfg,
        )

    def check(self, request: GenerationRequest | ResolvedRequest) -> ResolvedRequest:
        """Every check of ``request`` that needs no model, the prompt's token count included
        (the tokenizer only): ``ValueError`` (``CaptionError``) or ``OSError`` naming it. A
        ``ResolvedRequest`` (``request.validate()``'s) is not validated again; only its
        prompt's length is checked."""
        if not isinstance(request, ResolvedRequest):
            request = self.options.shape_request(request)  # a single-branch DiT: guidance 1
        resolved = request if isinstance(request, ResolvedRequest) else request.validate()
        self.check_uncond(resolved.schedule.guidance)
        r = resolved.request  # too long: fails before any model loads
        if not (r.magic_prompt or r.remix):
            self.prompt_encoder().token_ids(resolved.request.prompt)
        return resolved

    def start(
        self,
        request: GenerationRequest | ResolvedRequest,
        noise: np.ndarray | None = None,
        verbose: bool = False,
        report: Report | None = None,
    ) -> Generation:
        """Validate ``request`` (before any model loads; a ``ResolvedRequest`` from
        :meth:`check` is not validated twice) and return its :class:`Generation`: iterate it
        for the denoising steps, then call ``result()``. ``report`` receives a
        line as the encode and decode stages start and end (``verbose`` adds peak memory);
        the default prints them when ``verbose``. See :meth:`generate`."""
        if report is None and verbose:
            report = print
        resolved = self.check(request)
        return Generation(self.components(), resolved, noise, verbose, report)

    def generate(
        self,
        prompt: str | GenerationRequest = "",
        noise: np.ndarray | None = None,
        callback: Callable[[int, int, mx.array], None] | None = None,
        verbose: bool = False,
        check_text: bool = False,
        retry_text: int = 0,
        ocr: str | None = None,
        text_threshold: float | None = None,
        **settings,
    ) -> GenerationResult:
        """One image for one prompt.

        Args:
            prompt: a JSON caption (recommended) or plain text, or a ``GenerationRequest``.
            settings: the other ``GenerationRequest`` fields, by name: ``width``, ``height``
                (multiples of 16 in 256..2048, aspect ratio at most 6:1), ``preset``
                (``V4_QUALITY_48``, ``V4_DEFAULT_20``, ``V4_TURBO_12``), ``num_steps``,
                ``guidance_schedule`` (chronological: entry 0 = first step), ``mu``, ``std``
                (override the preset), ``seed`` (None: random, recorded in the metadata),
                ``strict_caption`` (caption findings raise ``CaptionError`` before any model
                loads); edits: ``image`` (image-to-image, ``strength``), ``mask`` (inpainting,
                ``mask_grow``, ``mask_feather``, ``paste_back``), ``expand`` (outpainting),
                ``remix`` (no prompt: ``image`` described first, steered by ``idea``).
            noise: (1, H/16 * W/16, 128) float32 in the packed layout; replaces the seeded
                draw (for parity with other implementations).
            callback: ``callback(step, num_steps, latents)`` after every denoising step
                (0-based ``step``; ``latents`` (1, N, 128) fp32, evaluated): progress bars,
                previews, cancelling (raise). The model time (``start()``'s ``Step.t``) runs
                from 0 (noise) to 1 (clean), the opposite of diffusers' sigmas.
            verbose: print each stage's time and peak memory.
            check_text: read the image's text back with an OCR engine and score every text
                element of the caption (``result.text_scores``, the metadata's
                ``text_check``; docs/TEXT_CHECK.md).
            retry_text: N > 0: check, and while an element scores under ``text_threshold``
                (default 0.9) try the next seed, up to N images; the best is returned, every
                try in its metadata.
            ocr: the OCR engine (``ocr.ENGINES``; None: this platform's default).

        Returns a :class:`GenerationResult`; ``result.save(path)`` writes the PNG with its
        metadata (``result.image.save`` would drop it).
        """
        checking = text_check_from(check_text, retry_text, ocr, text_threshold)
        request = request_from_settings(prompt, settings)
        if checking is None:
            return self._generate(request, noise, callback, verbose)
        if checking.tries > 1 and (noise is not None or self.cfg is not None):
            why = "given noise has no next seed" if noise is not None else "CFG-parallel ranks"
            raise InputError(f"retry_text needs seeds of one process ({why}): use check_text")
        resolved = self.check(request)
        run = lambda r: self._generate(r, noise, callback, verbose)  # noqa: E731
        return generate_checked(run, resolved, checking, print if verbose else None)

    def _generate(self, request, noise, callback, verbose) -> GenerationResult:
        generation = self.start(request, noise, verbose)
        for step in generation:
            mx.eval(step.latents)
            if callback is not None:
                callback(step.index, step.num_steps, step.latents)
        return generation.result()


def load(model: PipelineOptions | str | Path = DEFAULT_REPO, **keywords) -> Ideogram4Pipeline:
    """A pipeline for :class:`PipelineOptions` (or a checkpoint folder or Hugging Face repo id
    and the options' fields as keywords, or the commands' names for them:
    :meth:`PipelineOptions.from_keywords`): load once, then generate many images.

    The options are validated before anything loads; ``dtype`` None (the default) becomes
    float32 on MLX's CPU backend and bfloat16 on Metal and CUDA (``pipe.dtype`` says which;
    a CPU run that stays slow, bf16 or quantized, warns). Components load on first use. A repo id
    is downloaded with huggingface_hub into its cache (only the files the pipeline reads).
    ``low_memory=True`` is ``memory_limit=0`` (every DiT block streamed). The LoRAs are read and
    checked here, before any weights load (:meth:`Ideogram4Pipeline.add_lora`); they run
    unfused (exact on any base; ``set_lora_scale`` changes one in place) unless ``fuse_lora``
    (not with a quantized checkpoint or low memory).

    ``transformer``: another conditional DiT (a folder, a repo id or a single .gguf/.safetensors
    file: ``dit_file``) in place of the checkpoint's, resolved (a repo id downloaded) and
    checked against the checkpoint's DiT config here (``InputError`` naming the key); its
    metadata records it with a fingerprint. A single-branch (CFG-distilled) DiT wants guidance
    1 (``guidance_schedule=(1,)``) and its own step count.

    ``distributed``: CFG-parallel on the two ranks ``mlx.launch -n 2`` started
    (``distributed.py``): rank 0 holds the text encoder, the conditional DiT and the VAE, rank 1
    the unconditional DiT; every step one velocity is swapped; rank 0's image equals one
    process's bit for bit, rank 1's ``result()`` is None. ``DistributedError`` without a
    launcher, with another rank count, or when the ranks' checkpoints differ.
    """
    if isinstance(model, PipelineOptions):
        options = PipelineOptions.from_keywords(model, **keywords) if keywords else model
    else:
        options = PipelineOptions.from_keywords(model=model, **keywords)
    options = options.validate()
    checkpoint_dir, model_id, revision = resolve_model(options.model, options.revision)
    options = replace(options, model=model_id, revision=revision)
    transformer_dir = None
    if options.transformer is not None:  # checked against the checkpoint before any weights
        transformer_dir, identity = resolve_transformer(options.transformer)
        transformer_dir = dit_file.dit_source(transformer_dir, checkpoint_dir)  # a file: dit_file
        dit_file.check_dit(transformer_dir, checkpoint_dir)
        options = replace(options, transformer=identity)
    pipe = Ideogram4Pipeline(checkpoint_dir, options, transformer_dir)
    if pipe.uncond_file is not None:
        dit_file.check_dit(pipe.uncond_file, checkpoint_dir)
    for spec in options.loras:
        pipe.add_lora(spec, options.lora_allow_partial)
    if pipe.delta_source is not None:  # checked against the DiT's skeleton: no weights load
        skeleton = dit_file.build_dit(pipe.dit_dir(DIT_COMPONENTS[0][0]))
        pipe.uncond_delta = read_uncond_delta(pipe.delta_source, skeleton)
    warn_if_slow(options.dtype, pipe.quantization() is not None)
    return pipe

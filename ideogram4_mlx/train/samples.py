"""Sample images while a LoRA trains (``train-lora --sample-prompt``): each prompt rendered
with the DiT being trained, every ``--sample-every`` steps, into ``OUT.samples/``.

The prompts are encoded once before training (the text encoder is let go after), and
each sample runs the pipeline's own ``Generation`` with the trained DiT for both branches: the
unconditional pass runs it without text, as ``--uncond self`` does (an approximation that keeps
a second DiT out of memory while training). A sample's PNG carries its metadata.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from ideogram4_mlx.errors import InputError
from ideogram4_mlx.generation import Generation
from ideogram4_mlx.metadata import save_png
from ideogram4_mlx.request import GenerationRequest

MAX_SAMPLE_PROMPTS = 8  # each sample costs a full generation per prompt


class TrainingSamples:
    """Renders ``prompts`` at ``size`` (width, height) with ``seed`` and ``num_steps`` into
    ``folder`` (``step-000100-1.png``, ...) each time :meth:`render` is called."""

    def __init__(
        self,
        pipe,
        prompts: list[str],
        folder: Path | str,
        size: tuple[int, int] = (1024, 1024),
        seed: int = 0,
        num_steps: int = 20,
    ):
        if not 1 <= len(prompts) <= MAX_SAMPLE_PROMPTS:
            raise InputError(f"{len(prompts)} sample prompts: give 1..{MAX_SAMPLE_PROMPTS}")
        self.pipe, self.folder = pipe, Path(folder)
        width, height = size
        self.requests = [
            pipe.check(
                GenerationRequest(p, width=width, height=height, seed=seed, num_steps=num_steps)
            )  # fmt: skip
            for p in prompts
        ]  # every prompt checked (and its token count) before training starts
        # Encoded now and kept here: no text encoder while training.
        self.features = {r.request.prompt: pipe.encode(r.request.prompt) for r in self.requests}

    def render(self, model, step: int) -> list[Path]:
        """Each prompt's image with ``model`` (the DiT being trained) after ``step`` steps."""
        components = replace(
            self.pipe.components(),
            encode=self.features.__getitem__,
            dits=lambda tokens, uncond=True: (model, model if uncond else None),
            release=lambda name: None,  # the VAE stays for the next samples
        )
        paths = []
        for i, request in enumerate(self.requests):
            generation = Generation(components, request)
            for denoised in generation:
                mx.eval(denoised.latents)
            result = generation.result()
            path = self.folder / f"step-{step:06d}-{i + 1}.png"
            self.folder.mkdir(parents=True, exist_ok=True)
            paths.append(save_png(result.image, path, result.metadata, force=True))
        return paths

"""Synthetic checkpoints in the other layouts users hold (``ideo4-mlx synth --layout``,
``--dit-files``): the nf4 releases, Comfy-Org's single-file DiTs and GGUF DiTs, each written from
a synthetic fp8 snapshot by its format's writer (``synth.nf4``, ``synth.comfy``, ``synth.gguf``),
so every source the converter reads has a file to be tested on (MODEL_NOTES#checkpoint-formats).

Single DiT files go to ``DST/diffusion_models/`` under the names the published files have, as a
ComfyUI models folder holds them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ideogram4_mlx.errors import InputError

# --layout: the checkpoint folder's own layout -> (nf4 key naming, nf4 layout).
LAYOUTS = {
    "fp8": None,
    "nf4": ("split", "nf4"),
    "nf4-fused": ("fused", "nf4"),
    "nf4-diffusers": ("split", "nf4-diffusers"),
}
DIT_FOLDER = "diffusion_models"
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K", "BF16", "F16")
COMFY_KINDS = {"comfy-fp8": "fp8_scaled", "comfy-nvfp4": "nvfp4_mixed"}
# --dit-files: the formats a DiT file can be written in.
DIT_FILE_FORMATS = (*COMFY_KINDS, *(f"gguf-{t}" for t in GGUF_TYPES))
DIT_NAMES = ("transformer", "unconditional_transformer")


def dit_file_names(fmt: str) -> tuple[str, str]:
    """The published names of the two DiT files of ``fmt`` (Comfy-Org/Ideogram-4's
    ``diffusion_models/``; molbal/ideogram-4-gguf's ``ideogram4-<component>-<type>.gguf``)."""
    if fmt in COMFY_KINDS:
        kind = COMFY_KINDS[fmt]
        return f"ideogram4_{kind}.safetensors", f"ideogram4_unconditional_{kind}.safetensors"
    qtype = fmt.removeprefix("gguf-")
    return tuple(f"ideogram4-{name}-{qtype}.gguf" for name in DIT_NAMES)


def convert_layout(dst: Path, layout: str, force: bool) -> Path:
    """Rewrite the fp8 snapshot just written at ``dst`` in ``layout`` (in place: written beside
    it, then renamed over it)."""
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if LAYOUTS[layout] is None:
        return dst
    from ideogram4_mlx.synth.nf4 import write_nf4_checkpoint

    naming, nf4_layout = LAYOUTS[layout]
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.fp8.") as tmp:
        source = Path(tmp) / "fp8"
        dst.rename(source)
        write_nf4_checkpoint(source, dst, naming=naming, layout=nf4_layout, force=force)
        if (source / DIT_FOLDER).is_dir():  # --dit-files, written from the fp8 DiTs
            (source / DIT_FOLDER).rename(dst / DIT_FOLDER)
    return dst


def write_dit_files(fp8_snapshot: Path, dst: Path, fmt: str) -> list[Path]:
    """Both DiTs of ``fp8_snapshot`` as single ``fmt`` files in ``dst/diffusion_models/``."""
    if fmt not in DIT_FILE_FORMATS:
        raise InputError(f"unknown DiT file format {fmt!r}; use one of {DIT_FILE_FORMATS}")
    folder = dst / DIT_FOLDER
    if folder.exists():
        shutil.rmtree(folder)  # an earlier synth's files (--force was checked by the caller)
    folder.mkdir()
    written = []
    for name, file_name in zip(DIT_NAMES, dit_file_names(fmt), strict=True):
        path = folder / file_name
        if fmt in COMFY_KINDS:
            from ideogram4_mlx.synth.comfy import write_comfy_dit

            write_comfy_dit(fp8_snapshot / name, path, COMFY_KINDS[fmt])
        else:
            from ideogram4_mlx.synth.gguf import write_gguf_dit

            write_gguf_dit(fp8_snapshot / name, path, fmt.removeprefix("gguf-"))
        written.append(path)
    return written

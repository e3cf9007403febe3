"""README.md's shell commands, run on the session's synthetic checkpoint (#15).

Every ```bash block runs on its own, as a user pasting it would: its `ideo4-mlx` lines in
order (pip, pytest, apt-get, export and other lines are skipped) through the CLI's entry
point, in a fresh working folder with its own /tmp and ~. A command that uses a folder an
earlier `ideo4-mlx synth` line of its block wrote is for the synthetic checkpoint and runs
exactly as written; every other command is for the real model and runs with SUBSTITUTIONS and
SMALL. Each must exit 0, do what it says (CHECKS) and finish in under 5 minutes. The Quick
start's block is checked once more on its own: two commands, the second generating from the
first one's checkpoint, and the image where the README says it lands.
"""

import importlib
import json
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import require_reference
from PIL import Image
from safetensors.numpy import save_file

from ideogram4_mlx.caption import verify_raw
from ideogram4_mlx.cli import main
from ideogram4_mlx.edit import DEFAULT_STRENGTH, REMIX_STRENGTH
from ideogram4_mlx.lora import linear_shapes, read_lora
from ideogram4_mlx.metadata import read_metadata
from ideogram4_mlx.transformer import Ideogram4Transformer
from ideogram4_mlx.weights import conversion_record

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLE_CAPTION = ROOT / "examples" / "poster.json"
CAPTION = {
    "high_level_description": "a red sign that says OPEN on a white wall",
    "compositional_deconstruction": {
        "background": "a white wall",
        "elements": [{"type": "text", "text": "OPEN", "desc": "bold red letters"}],
    },
}
PROGRAMS = (["ideo4-mlx"], ["python", "-m", "ideogram4_mlx"])
SECONDS = 300  # #15: each README command finishes in under 5 minutes here
SHELL = {"|", ">", ">>", "<", "2>", "&"}  # pipes and redirections: not runnable here

# README text -> what runs instead: an argument equal to the text, or starting with it when
# the text ends in "/"; the first matching row wins.
SUBSTITUTIONS = [
    # The gated 9.3B checkpoint: the session's tiny synthetic one, in the same layout.
    ("ideogram-ai/ideogram-4-fp8", "{tiny}"),
    # The README's placeholder caption: a real one (examples/poster.json, else CAPTION).
    ("caption.json", "{caption}"),
    # The README's placeholder input image and mask (edits): a small photo and its mask.
    ("photo.jpg", "{photo}"),
    ("mask.png", "{mask}"),
    # The README's LoRA: one for the tiny checkpoint's DiT, with a scale when written with one.
    ("my-style.safetensors", "{lora}"),
    ("my-style.safetensors:0.8", "{lora}:0.8"),
    # Files of the checkout, which the README's commands run in: read from this repository.
    ("examples/", "{root}/examples/"),
    # The user's home, where a shell would expand ~: a folder of this test's own.
    ("~/", "{home}/"),
    # Scratch paths: into this test's folder, so runs share nothing and leave nothing.
    ("/tmp/", "{tmp}/"),
]
# Real-model commands also get these options (click keeps an option's last value): a small
# fp32 image in 2 steps. A `generate` without --model would load the gated checkpoint, so it
# first gets `--model {tiny}`; as written (SUBSTITUTIONS only) it must pass every check up to
# loading the model, so a size the CLI refuses fails here. A `generate --from-metadata` gets
# nothing: it replays an image a substituted command made (tiny model, small size).
SMALL = {
    "generate": ["--width", "256", "--height", "256", "--dtype", "float32", "--steps", "2"],
    "crosscheck": ["--width", "256", "--height", "256", "--dtype", "float32", "--steps", "2"],
}


def readme_blocks(text: str | None = None) -> list[list[tuple[str, list[str]]]]:
    """``[(line as written, arguments after the program)]`` for each bash block with any, in
    ``text`` (the whole README by default)."""
    if text is None:
        text = README.read_text(encoding="utf-8")
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        commands = []
        for line in body.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            parts, part = [], []
            for token in tokens + ["&&"]:
                if token in ("&&", ";", "||"):
                    parts.append(part)
                    part = []
                else:
                    part.append(token)
            for part in parts:
                program = next((p for p in PROGRAMS if part[: len(p)] == p), None)
                if program is not None and not SHELL & set(part):
                    commands.append((line.strip(), part[len(program) :]))
                elif {"ideo4-mlx", "ideogram4_mlx"} & set(part):
                    commands.append((line.strip(), None))  # fails below: not runnable here
        if commands:
            blocks.append(commands)
    return blocks


BLOCKS = readme_blocks()


def block_id(commands) -> str:
    return "+".join((args or ["?"])[0] for _, args in commands)


def test_the_readme_has_commands_to_check():
    """Guards the parser: the README shows generate, synth and convert in bash blocks."""
    seen = {args[0] for block in BLOCKS for _, args in block if args}
    assert {"generate", "synth", "convert"} <= seen, seen


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("commands", BLOCKS, ids=[block_id(b) for b in BLOCKS])
def test_readme_block_runs(commands, tiny_checkpoint, tmp_path, monkeypatch):
    run_block(commands, tiny_checkpoint, tmp_path, monkeypatch)


def quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Quick start\n")
    return text[start : text.index("\n## ", start + 1)]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_quick_start_makes_an_image_in_two_commands(tiny_checkpoint, tmp_path, monkeypatch):
    """The README's first commands: synth a tiny checkpoint, generate from it (as written: no
    substitution but /tmp), and the image is where the README says it lands."""
    section = quick_start()
    first = readme_blocks(section)[0]
    assert [args[0] for _, args in first] == ["synth", "generate"], first
    synth, generate = (args for _, args in first)
    folder = parse(synth)["dst"]
    assert Path(parse(generate)["model"]) == folder, "generate does not use the synth folder"
    output = parse(generate)["output"]
    assert f"The image lands in `{output}`" in section
    paths = run_block(first, tiny_checkpoint, tmp_path, monkeypatch)
    landed = Path(substitute(str(output), paths))
    with Image.open(landed) as image:
        assert image.format == "PNG" and image.size == (
            parse(generate)["width"],
            parse(generate)["height"],
        )


def run_block(commands, tiny_checkpoint, tmp_path, monkeypatch) -> dict:
    """Runs one README block's commands (see the module docstring); returns the paths that
    SUBSTITUTIONS fill in."""
    paths = {"tiny": tiny_checkpoint, "tmp": tmp_path / "tmp", "home": tmp_path / "home"}
    paths["root"] = ROOT
    paths["caption"] = EXAMPLE_CAPTION if EXAMPLE_CAPTION.is_file() else write_caption(tmp_path)
    paths["photo"], paths["mask"] = write_edit_inputs(tmp_path)
    paths["lora"] = write_lora(tmp_path, tiny_checkpoint)
    for folder in ("tmp", "home", "work"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "work")
    synthesized = []  # folders written by `synth` in this block
    for line, args in commands:
        assert args is not None, f"README: `{line}`: this test cannot run it; extend it"
        args = [substitute(a, paths) for a in args]
        if {"--help", "--version"} & set(args):
            pass
        elif args[0] == "synth":
            synthesized.append(parse(args)["dst"].resolve())
        elif not uses(args, synthesized):
            if args[0] == "generate":
                checked = dry_run(args, monkeypatch)
                assert isinstance(checked.exception, Loading), (
                    f"README: `{line}`\nas written it fails:\n{checked.output}"
                )
            args = real_model(args, paths)
        if args[0] == "crosscheck":
            require_reference()
        start = time.monotonic()
        result = CliRunner().invoke(main, args)
        seconds = time.monotonic() - start
        ran = f"README: `{line}`\nran: ideo4-mlx {shlex.join(args)}\n{result.output[-3000:]}"
        assert result.exit_code == 0, ran
        if not {"--help", "--version"} & set(args):
            check = CHECKS.get(args[0])
            assert check, f"{ran}\nno check for `{args[0]}`: add one to CHECKS in {__file__}"
            check(parse(args), result.output)
        assert seconds < SECONDS, f"{ran}\ntook {seconds:.0f} s"
    return paths


def parse(args: list[str]) -> dict:
    """The command's parameters as click reads ``args`` (defaults filled in)."""
    return main.commands[args[0]].make_context(args[0], args[1:]).params


class Loading(Exception):
    """Raised in place of loading the model: the command got that far."""


def dry_run(args: list[str], monkeypatch):
    def stop(*args, **kwargs):
        raise Loading

    with monkeypatch.context() as patch:
        patch.setattr(importlib.import_module("ideogram4_mlx.cli.generate"), "load", stop)
        return CliRunner().invoke(main, args)


def write_caption(tmp_path: Path) -> Path:
    path = tmp_path / "caption.json"
    path.write_text(json.dumps(CAPTION), encoding="utf-8")
    return path


def write_edit_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A 320x256 JPEG photo (a gradient) and a mask of its size with a white rectangle."""
    yy, xx = np.mgrid[0:256, 0:320]
    photo = np.stack([xx * 255 // 319, yy * 255 // 255, (xx + yy) % 256], -1).astype(np.uint8)
    mask = np.zeros((256, 320), np.uint8)
    mask[64:160, 96:224] = 255
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "photo.jpg", tmp_path / "mask.png"


def write_lora(tmp_path: Path, checkpoint: Path) -> Path:
    """A rank-2 LoRA (DiffSynth layout) on every block linear of the checkpoint's DiT."""
    shapes = linear_shapes(Ideogram4Transformer.build(checkpoint / "transformer"))
    rng = np.random.default_rng(0)
    tensors = {}
    for name, (out, inp) in shapes.items():
        if name.startswith("layers."):
            tensors[f"{name}.lora_A.weight"] = rng.standard_normal((2, inp), np.float32) * 0.1
            tensors[f"{name}.lora_B.weight"] = rng.standard_normal((out, 2), np.float32) * 0.1
    save_file(tensors, str(tmp_path / "my-style.safetensors"))
    return tmp_path / "my-style.safetensors"


def substitute(arg: str, paths: dict) -> str:
    for text, replacement in SUBSTITUTIONS:
        if arg == text or (text.endswith("/") and arg.startswith(text)):
            return replacement.format(**{k: str(v) for k, v in paths.items()}) + arg[len(text) :]
    return arg


def uses(args: list[str], folders: list[Path]) -> bool:
    """Whether an argument names one of ``folders`` or a path inside one."""
    for arg in args:
        path = Path(arg).resolve()
        if any(path == f or f in path.parents for f in folders):
            return True
    return False


def real_model(args: list[str], paths: dict) -> list[str]:
    if args[0] == "generate" and "--from-metadata" in args:
        return args
    if args[0] == "generate" and "--model" not in args:
        args = [*args, "--model", str(paths["tiny"])]
    small = SMALL.get(args[0], [])
    if "--image" in args:  # an edit keeps its input's (small) size
        pairs = zip(small[::2], small[1::2], strict=True)
        small = [x for k, v in pairs if k not in ("--width", "--height") for x in (k, v)]
    return [*args, *small]


def check_generate(params: dict, output: str):
    metadata = read_metadata(params["output"])  # our PNG, with its settings
    with Image.open(params["output"]) as image:
        size = image.size
    if params["from_metadata"] is not None:
        source = read_metadata(params["from_metadata"])
        assert size == (source["width"], source["height"]) and metadata["seed"] == source["seed"]
    elif params["image"] is not None or params["remix"] is not None:  # an edit (a remix is one):
        # the input's size (plus --expand), recorded
        left, top, right, bottom = params["expand"] or (0, 0, 0, 0)
        with Image.open(params["image"] or params["remix"]) as image:
            natural = (image.width + left + right, image.height + top + bottom)
        assert size == (params["width"] or natural[0], params["height"] or natural[1])
        masked = params["mask"] is not None or params["expand"] is not None
        default = REMIX_STRENGTH if params["remix"] else DEFAULT_STRENGTH
        strength = params["strength"] or (1.0 if masked else default)
        assert metadata["image_sha256"] and metadata["strength"] == strength
        if params["remix"] is not None:  # the description is the prompt, and recorded
            assert metadata["remix"]["description"] == metadata["prompt"], metadata
            assert verify_raw(metadata["prompt"]) == [], metadata["prompt"]
    else:
        assert size == (params["width"], params["height"])
    given = [
        (spec.resolved().scale, spec.target) for spec in params["loras"] + params["uncond_loras"]
    ]
    stored = [(r["scale"], r["target"]) for r in metadata.get("loras", [])]
    assert stored == given or params["from_metadata"] is not None, (stored, given)


def check_synth(params: dict, output: str):
    index = json.loads((params["dst"] / "model_index.json").read_text())
    for name in ("transformer", "unconditional_transformer", "text_encoder", "vae"):
        assert name in index and (params["dst"] / name / "config.json").is_file(), name


def check_convert(params: dict, output: str):
    folders = [p.parent for p in params["dst"].glob("*/config.json")]
    assert folders, f"{params['dst']}: no component folders"
    for folder in folders:
        assert conversion_record(folder) is not None, f"{folder}: no conversion record"
    quantize = params["quantize"]
    quantization = conversion_record(params["dst"] / "transformer")["quantization"]
    if quantize is not None and quantize.isdigit():
        assert quantization["bits"] == int(quantize)
    elif quantize == "keep":  # a GGUF's Q4_0 blocks copied as they are
        assert quantization["recipe"] == "keep", quantization
    elif quantize is not None and quantize != "none":
        assert quantization["mode"] == quantize, quantization
    baked = conversion_record(params["dst"] / "transformer").get("loras", [])
    assert len(baked) == len(params["loras"])


def check_verify_caption(params: dict, output: str):
    assert output.strip().endswith(": ok"), output


def check_crosscheck(params: dict, output: str):
    assert "token ids equal      : True" in output, output
    for stage in ("text features", "first-step velocity", "final latents", "PSNR"):
        assert stage in output, output


def check_magic_prompt(params: dict, output: str):
    caption = Path(params["output"]).read_text(encoding="utf-8") if params["output"] else output
    assert verify_raw(caption.strip()) == [], caption  # the grammar's promise


def check_lora_info(params: dict, output: str):
    # the README's my-style.safetensors is a DiffSynth rank-2 file; synth --lora writes rank 4
    assert re.search(r"^layout    : (DiffSynth-Studio|diffusers/PEFT)$", output, re.M), output
    assert re.search(r"^rank\(s\)   : [24]$", output, re.M) and "names     :" in output, output
    if params["model"] is not None:  # against that checkpoint: the README promises "fits"
        assert re.search(r"^shapes    : fits: \d+ layers$", output, re.M), output


def check_models(params: dict, output: str):
    assert "Hugging Face cache" in output, output
    assert "unreadable" not in output, output
    for path in params["paths"]:
        if path.name == "diffusion_models":  # a folder of DiT files, each listed
            assert "DiT files" in output and all(str(f) in output for f in path.iterdir()), output
        else:
            assert f"{path}:" in output, output


def check_describe(params: dict, output: str):
    check_magic_prompt(params, output)  # the same grammar: a caption the verifier accepts


def check_train_lora(params: dict, output: str):
    lora = read_lora(params["out"])  # the diffusers/PEFT file our --lora reads
    assert lora.layout == "diffusers/PEFT" and lora.ranks == [params["rank"]], lora


CHECKS = {
    "train-lora": check_train_lora,
    "describe": check_describe,
    "generate": check_generate,
    "synth": check_synth,
    "convert": check_convert,
    "verify-caption": check_verify_caption,
    "crosscheck": check_crosscheck,
    "models": check_models,
    "magic-prompt": check_magic_prompt,
    "lora-info": check_lora_info,
}

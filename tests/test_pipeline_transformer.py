"""Another conditional DiT in place of the checkpoint's (``--transformer``): the same image as a
checkpoint built with it, recorded in the metadata, replayed, refused when it does not fit."""

import json
import shutil
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from ideogram4_mlx.cli import main
from ideogram4_mlx.errors import InputError
from ideogram4_mlx.memory import dit_sizes
from ideogram4_mlx.metadata import read_metadata, replay
from ideogram4_mlx.pipeline import load
from ideogram4_mlx.pipeline_options import PipelineOptions
from ideogram4_mlx.synth import COMPONENTS, write_synthetic_checkpoint
from ideogram4_mlx.synth.plan import resolve_spec
from ideogram4_mlx.transformer import Ideogram4Transformer
from ideogram4_mlx.weights import fingerprint

CAPTION = (
    '{"high_level_description":"a red sign","compositional_deconstruction":'
    '{"background":"white","elements":[{"type":"text","text":"OPEN","desc":"bold"}]}}'
)
FAST = {"width": 256, "height": 256, "num_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A second tiny DiT (another seed): a checkpoint folder holding only transformer/."""
    root = tmp_path_factory.mktemp("other") / "other"
    return write_synthetic_checkpoint(root, "tiny", seed=1, components=("transformer",))


@pytest.fixture(scope="module")
def combined(tiny_checkpoint, other, tmp_path_factory):
    """The tiny checkpoint with the other DiT as its transformer/ (linked folders)."""
    root = tmp_path_factory.mktemp("combined") / "ckpt"
    root.mkdir()
    shutil.copy(tiny_checkpoint / "model_index.json", root)
    for name in COMPONENTS:
        source = other if name == "transformer" else tiny_checkpoint
        (root / name).symlink_to(source / name, target_is_directory=True)
    return root


def image(pipe, **settings):
    return np.asarray(pipe.generate(CAPTION, **{**FAST, **settings}).image)


def test_swapped_dit_gives_the_image_of_a_checkpoint_built_with_it(
    tiny_checkpoint, other, combined
):
    base = image(load(tiny_checkpoint, dtype=mx.float32))
    built = image(load(combined, dtype=mx.float32))
    assert not np.array_equal(base, built)  # the other DiT changes the image
    for source in (other, other / "transformer"):  # a checkpoint folder or the DiT's own
        swapped = load(tiny_checkpoint, dtype=mx.float32, transformer=source)
        assert swapped.dit_dir("transformer") == other / "transformer"
        np.testing.assert_array_equal(image(swapped), built)


def test_metadata_records_the_dit_and_replay_finds_it(tiny_checkpoint, other, tmp_path):
    pipe = load(tiny_checkpoint, dtype=mx.float32, transformer=other)
    result = pipe.generate(CAPTION, **FAST)
    record = result.metadata["transformer"]
    assert record == {
        "source": str(other.resolve()),
        "fingerprint": fingerprint(other / "transformer"),
    }
    options, request = replay(result.metadata)
    assert options.transformer == str(other.resolve())
    again = load(options).generate(request)
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(result.image))

    moved = tmp_path / "moved"  # a moved DiT is found again by --transformer's override
    shutil.copytree(other / "transformer", moved)
    options, _ = replay(result.metadata, {"transformer": str(moved)})
    assert options.transformer == str(moved)
    with pytest.raises(InputError, match="not the conditional DiT the image was made with"):
        replay(result.metadata, {"transformer": str(tiny_checkpoint)})
    gone = {**result.metadata, "transformer": {**record, "source": str(tmp_path / "gone")}}
    with pytest.raises(InputError, match="give --transformer with where it is now"):
        replay(gone)
    plain = load(tiny_checkpoint, dtype=mx.float32).generate(CAPTION, **FAST).metadata
    assert "transformer" not in plain  # as before --transformer existed
    assert replay(plain)[0].transformer is None


def test_a_dit_for_another_text_encoder_is_refused_before_weights_load(tiny_checkpoint, tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()  # its config only: nothing may be read but configs
    config = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())
    config["llm_features_dim"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="llm_features_dim") as error:
        load(tiny_checkpoint, dtype=mx.float32, transformer=folder)
    assert "\n" not in str(error.value)
    with pytest.raises(Exception, match="holds no DiT"):
        load(tiny_checkpoint, dtype=mx.float32, transformer=tmp_path)


def test_memory_plan_reads_the_swapped_dit(tiny_checkpoint, tmp_path):
    spec = resolve_spec("tiny")
    deeper = replace(spec, dit_num_layers=spec.dit_num_layers + 2)
    root = write_synthetic_checkpoint(tmp_path / "deep", deeper, components=("transformer",))
    pipe = load(tiny_checkpoint, dtype=mx.float32, transformer=root)
    want = dit_sizes(root / "transformer", mx.float32)
    assert pipe.budget.sizes[0] == want
    assert len(pipe.budget.sizes[0].blocks) == spec.dit_num_layers + 2
    assert len(pipe.budget.sizes[1].blocks) == spec.dit_num_layers
    pipe.generate(CAPTION, **FAST)  # a DiT of another depth runs


def test_cli_generate_and_replay_with_transformer(tiny_checkpoint, other, tmp_path):
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    args = ["--model", tiny_checkpoint, "--dtype", "float32", "--steps", "2"]
    sizes = ["--width", "256", "--height", "256", "--seed", "3"]
    first = ["generate", *args, *sizes, "--prompt", CAPTION, "--transformer", other, "-o", out]
    result = CliRunner().invoke(main, [str(a) for a in first])
    assert result.exit_code == 0, result.output
    assert read_metadata(out)["transformer"]["source"] == str(other.resolve())
    replayed = ["generate", "--from-metadata", out, "-o", again]
    result = CliRunner().invoke(main, [str(a) for a in replayed])
    assert result.exit_code == 0, result.output
    assert read_metadata(again)["transformer"] == read_metadata(out)["transformer"]
    with open(out, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()


def test_a_single_branch_dit_runs_guidance_1_unless_a_schedule_is_given(
    tiny_checkpoint, other, tmp_path, monkeypatch
):
    """A DiT distilled without CFG (--single-branch, or a known repo such as fal's Instant)
    gets guidance 1 on every step when the request gives no schedule: the unconditional DiT
    never loads, and the metadata stores the schedule as run."""
    assert PipelineOptions(transformer="fal/ideogram-v4-instant@abc").is_single_branch
    assert PipelineOptions(transformer="fal/ideogram-v4-fast").is_single_branch
    assert not PipelineOptions(transformer="someone/other-dit").is_single_branch
    assert not PipelineOptions(
        transformer="fal/ideogram-v4-instant", single_branch=False
    ).is_single_branch
    pipe = load(tiny_checkpoint, dtype=mx.float32, transformer=other, single_branch=True)
    loaded = []
    real = Ideogram4Transformer.from_pretrained
    monkeypatch.setattr(
        Ideogram4Transformer, "from_pretrained",
        lambda folder, *a, **k: loaded.append(folder.name) or real(folder, *a, **k),
    )  # fmt: skip
    result = pipe.generate(CAPTION, **FAST)
    assert set(result.metadata["guidance_schedule"]) == {1.0}
    assert loaded == ["transformer"]  # the unconditional DiT was not needed
    given = pipe.generate(CAPTION, **FAST, guidance_schedule=(4.0,))  # a schedule wins
    assert set(given.metadata["guidance_schedule"]) == {4.0}
    out = tmp_path / "single.png"
    args = ["generate", "--model", str(tiny_checkpoint), "--dtype", "float32", "--prompt", CAPTION,
            "--transformer", str(other), "--single-branch", "--steps", "2", "--width", "256",
            "--height", "256", "--output", str(out)]  # fmt: skip
    assert CliRunner().invoke(main, args).exit_code == 0
    assert set(read_metadata(out)["guidance_schedule"]) == {1.0}

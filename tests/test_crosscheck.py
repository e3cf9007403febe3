"""`ideo4-mlx crosscheck` messages: a converted folder is refused up front, and loading the
reference prints none of diffusers' installation advice."""

import logging
import re

import pytest
from click.testing import CliRunner
from helpers import require_reference

from ideogram4_mlx.cli import main
from ideogram4_mlx.convert import convert


@pytest.fixture(scope="module")
def converted_vae(tiny_checkpoint, tmp_path_factory):
    return convert(
        tiny_checkpoint, tmp_path_factory.mktemp("conv") / "vae-only", components=("vae",),
        progress=False,
    )  # fmt: skip


def test_crosscheck_refuses_a_converted_folder_in_one_line(converted_vae, tiny_checkpoint):
    require_reference()
    result = CliRunner().invoke(main, ["crosscheck", str(converted_vae)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.count("\n") == 1 and len(result.output) < 400
    assert (
        f"crosscheck needs the original fp8 snapshot ({converted_vae} was converted by "
        "ideo4-mlx convert: vae/config.json has an mlx_conversion record)"
    ) in result.output
    assert f"converted from ({tiny_checkpoint})" in result.output


def test_reference_generate_refuses_a_converted_folder(converted_vae):
    require_reference()
    from ideogram4_mlx.config import CheckpointError
    from ideogram4_mlx.reference.pipeline import check_original

    with pytest.raises(CheckpointError, match="needs the original fp8 snapshot"):
        check_original(converted_vae)


def test_original_snapshot_passes_the_check(tiny_checkpoint):
    require_reference()
    from ideogram4_mlx.reference.pipeline import check_original

    check_original(tiny_checkpoint)


def test_reference_vae_loads_without_accelerate_advice(tiny_checkpoint, capfd):
    torch = require_reference()
    from ideogram4_mlx.reference.vae import load_reference_vae

    # diffusers logs through its own "diffusers" logger, whose handler holds the stderr of
    # import time; a handler of ours sees its records wherever they would have gone.
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        load_reference_vae(tiny_checkpoint / "vae", "cpu", torch.float32)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    out, err = capfd.readouterr()
    messages = [r.getMessage() for r in records] + [out, err]
    assert not [m for m in messages if "accelerate" in m]


# --- the verdict: each stage beside the parity tests' bound, PASS/FAIL, progress on stderr --------

CROSSCHECK = ["crosscheck", "--preset", "V4_TURBO_12", "--steps", "2"]
STAGES = ("MLX encode", "MLX denoise (2 steps)", "MLX decode", "reference (PyTorch on", "compare")


def run_crosscheck(checkpoint):
    result = CliRunner().invoke(main, [CROSSCHECK[0], str(checkpoint), *CROSSCHECK[1:]])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_passing_crosscheck_prints_progress_bounds_and_pass(tiny_checkpoint):
    require_reference()
    result = run_crosscheck(tiny_checkpoint)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[-1] == "PASS (float32 tolerances of the parity tests)"
    assert lines[0] == "token ids equal      : True ok"
    assert re.fullmatch(r"final latents        : rel L2 \S+ <= 1\.00e-03 ok", lines[-4])
    assert re.fullmatch(r"image                : max \|diff\| \d/255 <= 2/255 ok", lines[-3])
    progress = result.stderr.splitlines()
    for stage in STAGES:  # each stage announced, then done, in pipeline order
        starts = [i for i, line in enumerate(progress) if line.startswith(stage)]
        assert len(starts) == 2 and progress[starts[0]].endswith(" ..."), progress
        assert re.search(r": done in \d+\.\d s$", progress[starts[1]]), progress
    order = [next(i for i, line in enumerate(progress) if line.startswith(s)) for s in STAGES]
    assert order == sorted(order)
    assert not set(progress) & set(lines)  # progress on stderr only


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_stage_out_of_bounds_fails_naming_it(tiny_checkpoint, monkeypatch):
    require_reference()
    from ideogram4_mlx.reference import crosscheck

    bounds = {**crosscheck.TOLERANCES["float32"], "latents_rel_l2": 0.0}
    monkeypatch.setitem(crosscheck.TOLERANCES, "float32", bounds)
    result = run_crosscheck(tiny_checkpoint)
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"final latents        : rel L2 \S+ <= 0\.00e\+00 FAIL", lines[-4])
    assert lines[-1] == "FAIL: final latents out of bounds (float32 tolerances of the parity tests)"
    assert "Error" not in result.output  # the report is the message


def test_verdicts_follow_each_bound_and_dtype():
    require_reference()
    from ideogram4_mlx.reference.crosscheck import TOLERANCES, CrossCheck

    def result(dtype, **values):
        measured = dict(
            token_ids_equal=True, features_rel_l2=1e-6, first_velocity_rel_l2=1e-6,
            latents_rel_l2=1e-5, image_max_abs_diff=1, image_psnr=60.0, grid_max_abs_diff=0.0,
        )  # fmt: skip
        return CrossCheck(**{**measured, **values}, ours_image=None, reference=None, dtype=dtype)

    assert result("float32").passed and result("bfloat16").passed
    assert result("float32", image_max_abs_diff=3).failures() == ["image"]
    assert result("bfloat16", image_max_abs_diff=9).passed  # bf16 bounds the PSNR instead
    assert result("bfloat16", image_psnr=29.0).failures() == ["image"]
    assert (
        "image                : PSNR 29.0 dB >= 30.0 dB FAIL"
        in result("bfloat16", image_psnr=29.0).lines()
    )
    assert result("float32", token_ids_equal=False, features_rel_l2=1.0).failures() == [
        "token ids", "text features"
    ]  # fmt: skip
    edit = result("float32", encoded_rel_l2=2e-4)
    assert edit.failures() == ["encoded input image"]
    assert "encoded input image  : rel L2 2.00e-04 <= 1.00e-04 FAIL" in edit.lines()
    assert result("float32", latents_rel_l2=1e-3).passed  # the bound itself passes
    assert set(TOLERANCES) == {"float32", "bfloat16", "float16"}
    assert {len(row) for row in TOLERANCES.values()} == {7}

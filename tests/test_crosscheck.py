"""`ideo4-mlx crosscheck` messages: a converted folder is refused up front, and loading the
reference prints none of diffusers' installation advice."""

import logging

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

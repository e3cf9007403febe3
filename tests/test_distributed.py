"""CFG-parallel on two ranks: ``mlx.launch -n 2 --backend ring`` on this host (CPU), the tiny
synthetic checkpoint. Rank 0's image must equal one process's bit for bit (each rank runs
the same ops on the same latents; the swap and the share are exact copies), in fp32 and bf16."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ideogram4_mlx.cli import main
from ideogram4_mlx.distributed import (
    DEFAULT_RANK_TIMEOUT,
    WATCHDOG_EXIT,
    CFGGroup,
    DistributedError,
    Watchdog,
    rank_timeout,
)
from ideogram4_mlx.sampler import KnownLatents, guide
from ideogram4_mlx.transformer import Ideogram4Transformer

CAPTION = '{"high_level_description":"a test","compositional_deconstruction":{"background":"x"}}'
LAUNCH_SECONDS = 240


def launcher() -> str:
    path = shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail("mlx.launch is not installed next to this Python (it comes with mlx)")
    return path


def generate_args(checkpoint, output, dtype, *extra):
    # guidance 1 at the second step: rank 1 skips its pass there, rank 0 still sends v_cond
    return [
        "generate", "--model", str(checkpoint), "--dtype", dtype, "--prompt", CAPTION,
        "--width", "256", "--height", "256", "--steps", "3", "--guidance-schedule", "5,1,3",
        "--seed", "11", "--output", str(output), *extra,
    ]  # fmt: skip


def launch(
    ranks: int, args: list[str], env: dict | None = None, script: Path | None = None
) -> subprocess.CompletedProcess:
    """``ideo4-mlx ARGS`` on ``ranks`` ranks (``script``, when given, runs instead of the
    package's ``__main__`` and takes the same arguments)."""
    command = [launcher(), "-n", str(ranks), "--backend", "ring", "--", sys.executable]
    command += [str(script)] if script is not None else ["-m", "ideogram4_mlx"]
    command += args
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=LAUNCH_SECONDS,
        env={**os.environ, **(env or {})},
    )


def dit_name(model: Ideogram4Transformer) -> str:
    return "uncond" if model.llm_cond_proj is None else "cond"  # uncond: text_input=False


# Runs ideo4-mlx with every DiT pass counted: one line per pass, "cond" or "uncond", in
# $PASSES<rank>.
COUNT_PASSES = """\
import os, runpy, sys
from ideogram4_mlx.transformer import Ideogram4Transformer
run = Ideogram4Transformer.run
def counted(self, *args):
    with open(os.environ["PASSES"] + os.environ["MLX_RANK"], "a") as f:
        f.write("uncond\\n" if self.llm_cond_proj is None else "cond\\n")
    return run(self, *args)
Ideogram4Transformer.run = counted
sys.argv = ["ideo4-mlx"] + sys.argv[1:]
runpy.run_module("ideogram4_mlx", run_name="__main__")
"""


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cfg_parallel_image_equals_one_process(tiny_checkpoint, tmp_path, dtype, monkeypatch):
    """Rank 0's image is one process's, and every DiT pass runs where it must: guidance 5, 1,
    3 is 3 conditional passes and 2 unconditional ones (none at guidance 1), in one process
    and over the ranks (rank 0 the conditional ones, rank 1 the unconditional ones)."""
    out = tmp_path / "out"
    out.mkdir()
    single, passes = out / "single.png", []
    dit_run = Ideogram4Transformer.run

    def counted(self, *args):
        passes.append(dit_name(self))
        return dit_run(self, *args)

    monkeypatch.setattr(Ideogram4Transformer, "run", counted)
    result = CliRunner().invoke(main, generate_args(tiny_checkpoint, single, dtype))
    assert result.exit_code == 0, result.output
    assert passes == ["cond", "uncond", "cond", "cond", "uncond"]
    script = tmp_path / "count_passes.py"
    script.write_text(COUNT_PASSES)
    parallel, counts = out / "parallel.png", tmp_path / "passes-rank"
    args = generate_args(tiny_checkpoint, parallel, dtype, "--distributed")
    run = launch(2, args, {"PASSES": str(counts)}, script)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    with Image.open(single) as a, Image.open(parallel) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.text["ideogram4-mlx"] != ""  # written by rank 0, with its metadata
    assert sorted(p.name for p in out.iterdir()) == ["parallel.png", "single.png"]
    assert Path(f"{counts}0").read_text().split() == ["cond"] * 3
    assert Path(f"{counts}1").read_text().split() == ["uncond"] * 2  # none at guidance 1


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cfg_parallel_inpainting_equals_one_process(tiny_checkpoint, tmp_path):
    """Rank 1 has no VAE: rank 0 sends the noised input latents and the known latents."""
    yy, xx = np.mgrid[0:256, 0:256] / 40.0
    pixels = np.stack([np.sin(xx) * np.cos(yy), np.cos(xx + yy), np.sin(0.5 * xx - yy)], -1)
    Image.fromarray(np.round(127.5 + 100 * pixels).astype(np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((256, 256), np.uint8)
    mask[64:160, 96:200] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    edit = ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png")]
    args = [
        "generate", "--model", str(tiny_checkpoint), "--dtype", "float32", "--prompt", CAPTION,
        "--steps", "3", "--guidance-schedule", "5,1,3", "--strength", "0.7", "--seed", "11",
        *edit,
    ]  # fmt: skip
    single, parallel = tmp_path / "single.png", tmp_path / "parallel.png"
    result = CliRunner().invoke(main, [*args, "--output", str(single)])
    assert result.exit_code == 0, result.output
    run = launch(2, [*args, "--output", str(parallel), "--distributed"])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    with Image.open(single) as a, Image.open(parallel) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class OneRank(CFGGroup):
    """A CFG-parallel rank whose peer sent ``theirs``: ``swap`` in one process."""

    def __init__(self, rank: int, theirs: mx.array):
        self.rank, self.theirs = rank, theirs

    def swap(self, velocity: mx.array) -> tuple[mx.array, mx.array]:
        mine = velocity.astype(mx.float32)
        return (mine, self.theirs) if self.rank == 0 else (self.theirs, mine)


def test_parallel_guidance_skips_rank_1s_pass_at_guidance_1_and_combines_as_one_process():
    z = mx.array(np.random.default_rng(0).standard_normal((1, 6, 128)), mx.float32)
    passes = []

    def cond(z, t):
        passes.append("cond")
        return 2 * z + t

    def uncond(z, t):
        passes.append("uncond")
        return t - z / 2

    for g, t in ((5.0, 0.2), (1.0, 0.5), (3.0, 0.7)):
        wanted = ["cond"] if g == 1 else ["cond", "uncond"]
        peer_cond, peer_uncond = cond(z, t), uncond(z, t)  # what the other rank sends
        passes.clear()
        want = guide(cond, uncond)(z, t, g)  # one process
        assert passes == wanted, g
        passes.clear()
        got0 = OneRank(0, peer_uncond).guided(cond, None)(z, t, g)
        got1 = OneRank(1, peer_cond).guided(None, uncond)(z, t, g)
        assert passes == wanted, g  # rank 1 runs no pass at guidance 1
        np.testing.assert_array_equal(np.array(got0), np.array(want))
        np.testing.assert_array_equal(np.array(got1), np.array(want))


def test_share_start_sends_rank_0s_latents_and_keeps_the_mask():
    """In one process (a group of one) the all_sum is rank 0's ``x + 0``: rank 0's latents come
    back exactly, as fp32; a rank 1 contributes zeros, its arguments giving only the shapes."""
    rng = np.random.default_rng(1)
    start, x0, noise = (mx.array(rng.standard_normal((1, 6, 128)), mx.float32) for _ in "abc")
    mask = mx.array(rng.uniform(size=(1, 6, 1)), mx.float32)
    for rank in (0, 1):
        group = CFGGroup(mx.distributed.init(), Watchdog(rank, 60.0))
        group.rank = rank  # a group of one is rank 0: stand in for rank 1's contribution
        assert group.leads == (rank == 0)
        got, known = group.share_start(start, KnownLatents(x0, noise.astype(mx.bfloat16), mask))
        assert got.dtype == known.x0.dtype == known.noise.dtype == mx.float32
        np.testing.assert_array_equal(np.array(known.mask), np.array(mask))
        want = (start, x0, noise.astype(mx.bfloat16).astype(mx.float32))
        for a, b in zip((got, known.x0, known.noise), want, strict=True):
            np.testing.assert_array_equal(np.array(a), np.array(b) * (rank == 0))
        assert group.share_start(start, None)[1] is None


def test_distributed_without_a_launcher_is_one_line(tiny_checkpoint, tmp_path):
    args = generate_args(tiny_checkpoint, tmp_path / "x.png", "float32", "--distributed")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "--distributed needs two ranks started by mlx.launch" in result.output
    assert not (tmp_path / "x.png").exists()


def test_three_ranks_and_different_checkpoints_are_refused(tiny_checkpoint, tmp_path):
    # (mlx.launch's own exit status does not always carry a rank's failure: check the output)
    run = launch(3, generate_args(tiny_checkpoint, tmp_path / "x.png", "float32", "--distributed"))
    assert "CFG-parallel runs on exactly 2 ranks" in run.stdout + run.stderr
    assert not (tmp_path / "x.png").exists()
    # rank 1 sees another checkpoint: a copy whose DiT config differs
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other, symlinks=True)
    config = other / "unconditional_transformer" / "config.json"
    config.write_text(config.read_text().replace("{", '{"note": "another", ', 1))
    script = tmp_path / "pick.py"
    script.write_text(
        "import os, runpy, sys\n"
        f"model = {str(tiny_checkpoint)!r} if os.environ['MLX_RANK'] == '0' else {str(other)!r}\n"
        "sys.argv = ['ideo4-mlx'] + [model if a == 'MODEL' else a for a in sys.argv[1:]]\n"
        "runpy.run_module('ideogram4_mlx', run_name='__main__')\n"
    )
    args = generate_args("MODEL", tmp_path / "y.png", "float32", "--distributed")
    command = [launcher(), "-n", "2", "--backend", "ring", "--", sys.executable, str(script)]
    run = subprocess.run(command + args, capture_output=True, text=True, timeout=LAUNCH_SECONDS)
    assert "the ranks load different checkpoints" in run.stdout + run.stderr
    assert not (tmp_path / "y.png").exists()


def test_a_dying_rank_stops_the_other_within_seconds(tiny_checkpoint, tmp_path):
    """Rank 1 dies mid-run: rank 0 must not hang in the next swap; it is stopped (the launcher
    ends the other ranks, the ring backend fails its pending exchange) and writes nothing."""
    script = tmp_path / "die.py"
    script.write_text(
        "import os, runpy, sys, threading\n"
        "if os.environ['MLX_RANK'] == '1':\n"
        "    threading.Timer(4.0, lambda: os._exit(9)).start()\n"
        "sys.argv = ['ideo4-mlx'] + sys.argv[1:]\n"
        "runpy.run_module('ideogram4_mlx', run_name='__main__')\n"
    )
    args = generate_args(tiny_checkpoint, tmp_path / "z.png", "float32", "--distributed")
    args[args.index("--steps") + 1] = "500"  # minutes of work: the death comes mid-run
    args[args.index("--guidance-schedule") + 1] = "5"
    command = [launcher(), "-n", "2", "--backend", "ring", "--", sys.executable, str(script)]
    start = time.monotonic()
    run = subprocess.run(command + args, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60, "rank 0 kept running after rank 1 died"
    assert "rank 1 exited with code 9" in run.stdout + run.stderr
    assert not (tmp_path / "z.png").exists()


def test_a_hung_rank_ends_the_run_after_the_timeout(tiny_checkpoint, tmp_path):
    """Rank 1 hangs in step 2 (alive, sockets open, no answer: what a frozen machine looks
    like to rank 0; its own watchdog is off). Rank 0 is blocked in the step's exchange; its
    watchdog ends it after IDEO4_RANK_TIMEOUT seconds with the message, and the launcher then
    stops rank 1. Without the watchdog this run never ends."""
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, runpy, sys, time\n"
        "import ideogram4_mlx.distributed as d\n"
        "if os.environ['MLX_RANK'] == '1':\n"
        "    d.Watchdog._watch = lambda self: None\n"
        "    swap, calls = d.CFGGroup.swap, []\n"
        "    def hanging(self, v):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 2:\n"
        "            time.sleep(600)\n"
        "        return swap(self, v)\n"
        "    d.CFGGroup.swap = hanging\n"
        "sys.argv = ['ideo4-mlx'] + sys.argv[1:]\n"
        "runpy.run_module('ideogram4_mlx', run_name='__main__')\n"
    )
    args = generate_args(tiny_checkpoint, tmp_path / "h.png", "float32", "--distributed")
    command = [launcher(), "-n", "2", "--backend", "ring", "--", sys.executable, str(script)]
    env = {**os.environ, "IDEO4_RANK_TIMEOUT": "4"}
    start = time.monotonic()
    run = subprocess.run(command + args, capture_output=True, text=True, timeout=120, env=env)
    assert time.monotonic() - start < 60, "the run outlived the watchdog"
    output = run.stdout + run.stderr
    assert "rank 0: no progress for" in output and "(step 2 of 3)" in output, output[-3000:]
    assert "set IDEO4_RANK_TIMEOUT=SECONDS to wait longer than 4" in output
    assert not (tmp_path / "h.png").exists()


def test_the_watchdog_ends_only_an_armed_process_that_makes_no_progress(tmp_path):
    code = (
        "import time\n"
        "from ideogram4_mlx.distributed import Watchdog\n"
        "w = Watchdog(1, 0.5)\n"
        "with w.watching('a test wait'):\n"
        "    for _ in range(8):\n"
        "        time.sleep(0.2); w.beat('beating')\n"  # beats in time: no exit
        "time.sleep(1.5)\n"  # disarmed: idle as long as it likes
        "print('idle ok', flush=True)\n"
        "with w.watching('the last wait'):\n"
        "    time.sleep(30)\n"
        "print('not reached')\n"
    )
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 10
    assert run.returncode == WATCHDOG_EXIT and run.stdout == "idle ok\n", run.stderr
    assert re.match(r"ideo4-mlx: rank 1: no progress for \d+ s \(the last wait\)", run.stderr)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon", str(10**9)])
def test_a_bad_rank_timeout_is_one_line(monkeypatch, value):
    monkeypatch.setenv("IDEO4_RANK_TIMEOUT", value)
    with pytest.raises(DistributedError, match=f"IDEO4_RANK_TIMEOUT='{value}' is not a timeout"):
        rank_timeout()
    monkeypatch.setenv("IDEO4_RANK_TIMEOUT", "2.5")
    assert rank_timeout() == 2.5
    monkeypatch.delenv("IDEO4_RANK_TIMEOUT")
    assert rank_timeout() == DEFAULT_RANK_TIMEOUT


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_num_images_over_two_ranks_equals_single_runs(tiny_checkpoint, tmp_path):
    """Data-parallel: 4 images spread over 2 ranks (each holding both DiTs), gathered to rank
    0, equal the 4 single runs of the same seeds; one process with --seeds equals them too."""
    base = generate_args(tiny_checkpoint, tmp_path / "many.png", "float32")
    base = [a for a in base if a not in ("--seed", "11")]
    run = launch(2, [*base, "--seed", "20", "--num-images", "4", "--distributed"])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"many-{s}.png" for s in (20, 21, 22, 23)], names
    sequential = [*base, "--seeds", "21,23", "--output", str(tmp_path / "seq.png")]
    assert CliRunner().invoke(main, sequential).exit_code == 0
    for seed in (20, 21, 22, 23):
        single = tmp_path / f"single-{seed}.png"
        args = [*base, "--seed", str(seed), "--output", str(single)]
        assert CliRunner().invoke(main, args).exit_code == 0
        with Image.open(single) as a, Image.open(tmp_path / f"many-{seed}.png") as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if seed in (21, 23):
            with Image.open(tmp_path / f"seq-{seed}.png") as c:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    result = CliRunner().invoke(main, [*base, "--seeds", "1,x"])
    assert (
        result.exit_code == 2
        and "'1,x' is not a comma-separated list (e.g. 1,5,9)" in result.output
    )


# Runs ideo4-mlx with the DiT folders each rank loads written, one a line, in $LOADS<rank>.
COUNT_LOADS = """\
import os, runpy, sys
from ideogram4_mlx.transformer import Ideogram4Transformer
real = Ideogram4Transformer.from_pretrained.__func__
def counted(cls, path, *args, **kwargs):
    with open(os.environ["LOADS"] + os.environ["MLX_RANK"], "a") as f:
        f.write(path.name + "\\n")
    return real(cls, path, *args, **kwargs)
Ideogram4Transformer.from_pretrained = classmethod(counted)
sys.argv = ["ideo4-mlx"] + sys.argv[1:]
runpy.run_module("ideogram4_mlx", run_name="__main__")
"""


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "schedule, uncond, rank_1_loads",
    [
        ("1", "checkpoint", []),  # no step calls it: rank 1 loads nothing and idles
        ("5,1,3", "self", ["transformer"]),  # rank 1: its own copy of the conditional DiT
    ],
)
def test_cfg_parallel_without_the_unconditional_folder(
    tmp_path, tiny_checkpoint, schedule, uncond, rank_1_loads
):
    """A checkpoint without unconditional_transformer/: rank 0's image is one process's."""
    checkpoint = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint, checkpoint, ignore=shutil.ignore_patterns("unconditional_*"))

    def args(output):
        given = generate_args(checkpoint, output, "float32", "--uncond", uncond)
        return [schedule if a == "5,1,3" else a for a in given]

    single, parallel = tmp_path / "single.png", tmp_path / "parallel.png"
    result = CliRunner().invoke(main, args(single))
    assert result.exit_code == 0, result.output
    script, loads = tmp_path / "count_loads.py", tmp_path / "loads-rank"
    script.write_text(COUNT_LOADS)
    run = launch(2, [*args(parallel), "--distributed"], {"LOADS": str(loads)}, script)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    with Image.open(single) as a, Image.open(parallel) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert Path(f"{loads}0").read_text().split() == ["transformer"]
    rank_1 = Path(f"{loads}1")
    assert (rank_1.read_text().split() if rank_1.exists() else []) == rank_1_loads

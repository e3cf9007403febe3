"""Packaging promises: torch-free core imports, tooling off the runtime path, namespaced CLI."""

import subprocess
import sys

from click.testing import CliRunner

from ideogram4_mlx import __version__
from ideogram4_mlx.cli import main

CORE_MODULES = ["transformer", "sampler", "caption", "weights", "synth", "constants", "cli"]
# Test and benchmark tooling that generation must never import.
TOOLING = ["ideogram4_mlx.synth.writer", "ideogram4_mlx.synth.tokenizer", "flops", "torch"]


def test_core_modules_import_without_torch():
    code = (
        "import sys\n"
        + "".join(f"import ideogram4_mlx.{m}\n" for m in CORE_MODULES)
        + "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runtime_imports_leave_tooling_out():
    code = (
        "import sys\n"
        "import ideogram4_mlx, ideogram4_mlx.cli, ideogram4_mlx.pipeline\n"
        f"print([m for m in {TOOLING!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_generic_top_level_packages_installed(tmp_path):
    # Run outside the checkout, whose cli/ and convert/ folders would shadow site-packages.
    code = "import importlib.util as u; print(u.find_spec('cli'), u.find_spec('convert'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "None None"


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "ideogram4_mlx", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert __version__ in out.stdout


def test_cli_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("generate", "convert", "crosscheck", "synth", "verify-caption"):
        assert command in result.output


def test_every_subpackage_is_installed():
    """pyproject's explicit package list names every folder with an __init__.py (a missing
    entry works in an editable install and breaks a wheel)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    line = re.search(r"^packages = \[(.*)\]$", (root / "pyproject.toml").read_text(), re.M)
    packages = set(re.findall(r'"([\w.]+)"', line.group(1)))
    found = {
        ".".join(("ideogram4_mlx", *p.parent.relative_to(root / "ideogram4_mlx").parts))
        for p in (root / "ideogram4_mlx").rglob("__init__.py")
    }
    assert found <= packages, sorted(found - packages)

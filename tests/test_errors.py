"""One error base: every error the library reports to a person is an ``Ideo4Error``.

The source is read with ``ast`` (nothing imported): a builtin ``ValueError``, ``RuntimeError``
or ``TypeError`` made anywhere in the library, the converter or the commands fails the test,
naming file:line, unless ``ALLOWED`` lists it.
"""

import ast
from pathlib import Path

import pytest

from ideogram4_mlx import errors
from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.describe.options import DescribeError
from ideogram4_mlx.distributed import DistributedError
from ideogram4_mlx.generation import NonFiniteError
from ideogram4_mlx.hub import ModelAccessError
from ideogram4_mlx.lora import LoRAError
from ideogram4_mlx.magic.constrain import CaptionIncompleteError
from ideogram4_mlx.magic.model import MissingHeadError
from ideogram4_mlx.magic.options import MagicPromptError
from ideogram4_mlx.request import CaptionError

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["ideogram4_mlx", "convert", "cli"]
BUILTINS = {"ValueError", "RuntimeError", "TypeError"}

# Files other work is converting: every site in them is allowed for now. Shrink this as each
# one moves to the error base.
NOT_YET: set[str] = set()  # files not converted yet: none
# Programming errors, not a person's: each fails only when code calls the library wrongly (or
# the library itself is wrong), never on a value a command or the server passes on. A
# traceback is the useful report there. (file, function) -> why.
ALLOWED = {
    ("ideogram4_mlx/generation.py", "Generation.result"): "called before the steps were run",
    ("ideogram4_mlx/latents.py", "patchify"): "shapes the library itself computed",
    ("ideogram4_mlx/latents.py", "unpatchify"): "shapes the library itself computed",
    ("ideogram4_mlx/text_encoder.py", "left_padding"): "masks come from prompt.pad_left",
    ("ideogram4_mlx/transformer.py", "Ideogram4Transformer.prepare"): "text features given "
    "to the text-free DiT",
    ("ideogram4_mlx/prompt.py", "PromptEncoder.load_model"): "built without a folder, loaded",
    ("ideogram4_mlx/prompt.py", "PromptEncoder.encode"): "an empty list of prompts",
    ("ideogram4_mlx/prompt.py", "PromptEncoder._run"): "used after release_model()",
    ("ideogram4_mlx/request.py", "GenerationRequest.schedule"): "used before validate()",
    ("ideogram4_mlx/request.py", "request_from_settings"): "an unknown keyword (TypeError)",
    ("ideogram4_mlx/pipeline_options.py", "PipelineOptions.from_keywords"): "an unknown "
    "keyword (TypeError)",
    ("ideogram4_mlx/magic/constrain.py", "hf_tokenizer"): "a tokenizer of another type",
    ("ideogram4_mlx/magic/constrain.py", "CaptionProcessor.__init__"): "the library's grammar",
    ("ideogram4_mlx/magic/constrain.py", "CaptionProcessor.__call__"): "another logits "
    "processor broke the grammar",
    ("ideogram4_mlx/magic/constrain.py", "finish_caption"): "text the grammar did not shape",
    ("ideogram4_mlx/synth/writer.py", "encode_e4m3"): "NaN from the synthetic weights' maker",
    ("convert/convert.py", "convert_component.write"): "the converter and the loader disagree",
}


def builtin_errors(path: Path) -> list[tuple[int, str, str]]:
    """(line, enclosing function as ``Class.method``, error name) for each builtin error made in
    ``path``."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            function = f"{function}.{node.name}" if function else node.name
        made = node.func if isinstance(node, ast.Call) else None
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Name):
            made = node.exc  # ``raise ValueError`` without arguments
        if isinstance(made, ast.Name) and made.id in BUILTINS:
            found.append((node.lineno, function, made.id))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), "")
    return found


def sources() -> list[Path]:
    return [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]


def test_the_library_raises_only_its_own_errors():
    """A ``raise ValueError(...)`` for a person's input is an ``InputError`` (or a subclass);
    only the programming errors in ``ALLOWED`` stay builtin."""
    offenders, used = [], set()
    for path in sources():
        name = path.relative_to(ROOT).as_posix()
        if name in NOT_YET:
            continue
        for line, function, error in builtin_errors(path):
            if (name, function) in ALLOWED:
                used.add((name, function))
            else:
                offenders.append(f"{name}:{line}: {error} in {function or 'the module'}")
    assert not offenders, (
        "raise an ideogram4_mlx.errors.InputError (or a subclass) for a person's input; "
        "a programming error goes in tests/test_errors.py ALLOWED with why:\n"
        + "\n".join(offenders)
    )
    assert not set(ALLOWED) - used, f"ALLOWED lists sites that are gone: {set(ALLOWED) - used}"


def test_not_yet_lists_existing_files():
    assert [f for f in NOT_YET if not (ROOT / f).is_file()] == []


def test_the_scan_finds_each_form(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "def f():\n    raise ValueError('x')\n"
        "def g():\n    raise RuntimeError\n"
        "def h():\n    return TypeError('y')\n"
        "def ok():\n    try:\n        pass\n    except ValueError:\n        raise\n"
    )
    path.write_text(path.read_text() + "class C:\n    def m(self):\n        raise TypeError\n")
    assert builtin_errors(path) == [(2, "f", "ValueError"), (4, "g", "RuntimeError"),
                                    (6, "h", "TypeError"), (14, "C.m", "TypeError")]  # fmt: skip


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (errors.InputError, ValueError),
        (CheckpointError, ValueError),
        (MissingHeadError, ValueError),
        (LoRAError, ValueError),
        (CaptionError, ValueError),
        (MagicPromptError, ValueError),
        (DescribeError, ValueError),
        (CaptionIncompleteError, ValueError),
        (NonFiniteError, ValueError),
        (ModelAccessError, RuntimeError),
        (DistributedError, RuntimeError),
    ],
)
def test_each_error_is_an_ideo4_error_and_keeps_its_builtin_base(error, builtin):
    assert issubclass(error, errors.Ideo4Error)
    assert issubclass(error, builtin)  # ``except ValueError`` written before the base still works
    assert error.__doc__, "each error says in one line what it means"


def test_input_errors_are_input_errors():
    for error in (CheckpointError, LoRAError, CaptionError, MagicPromptError, NonFiniteError):
        assert issubclass(error, errors.InputError)
    assert not issubclass(ModelAccessError, ValueError)  # a 503-like failure, not bad input

"""The config base: known fields, types and bounds, the file named in every error."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from ideogram4_mlx.config import MAX_LAYERS, MAX_WIDTH, BaseConfig, CheckpointError


@dataclass(frozen=True)
class Example(BaseConfig):
    width: int = 8
    section: tuple[int, int] = (1, 2)
    channels: tuple[int, ...] | None = None
    extra: object = None


def test_from_dict_keeps_known_fields_ignores_others_and_makes_tuples():
    config = Example.from_dict(
        {"width": 4, "section": [3, 4], "channels": [5], "extra": [6], "unknown": 1}
    )
    assert config == Example(width=4, section=(3, 4), channels=(5,), extra=[6])
    assert Example.from_dict({"channels": None}) == Example()


def test_from_file_reads_json_and_names_a_missing_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"section": [7, 8], "_class_name": "X"}))
    assert Example.from_file(path).section == (7, 8)
    with pytest.raises(CheckpointError, match="nope.json: file not found"):
        Example.from_file(tmp_path / "nope.json")


@dataclass(frozen=True)
class Bounded(BaseConfig):
    layers: int = 2
    width: int = 8
    eps: float = 1e-6
    name: str = "silu"
    flag: bool = True
    channels: tuple[int, ...] = (4, 8)

    layer_fields: ClassVar[tuple[str, ...]] = ("layers",)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("layers", 100_000_000, f"layers is 100000000, expected an integer from 1 to {MAX_LAYERS}"),
        ("layers", 0, "layers is 0, expected an integer from 1"),
        ("width", 10**11, f"width is 100000000000, expected an integer from 1 to {MAX_WIDTH}"),
        ("width", -8, "width is -8, expected an integer"),
        ("width", 8.0, "width is 8.0, expected an integer"),
        ("width", "8", "width is '8', expected an integer"),
        ("width", True, "width is True, expected an integer"),
        ("eps", float("nan"), "eps is nan, expected a finite number above 0"),
        ("eps", -1e-6, "eps is -1e-06, expected a finite number above 0"),
        ("eps", "1e-6", "eps is '1e-6', expected a finite number"),
        ("name", 3, "name is 3, expected a string"),
        ("flag", "yes", "flag is 'yes', expected true or false"),
        ("channels", 4, "channels is 4, expected a list"),
        ("channels", [4, 1 << 21], r"channels\[1\] is 2097152, expected an integer from 1 to"),
        ("channels", [4] * (MAX_LAYERS + 1), "channels is .*, expected a list"),
    ],
)
def test_from_dict_bounds_every_field_and_names_it(field, value, message):
    """config.json values are checked before any model is built: types, and integers between
    1 and a generous maximum (layers MAX_LAYERS, widths MAX_WIDTH)."""
    with pytest.raises(CheckpointError, match=message):
        Bounded.from_dict({field: value})


def test_from_dict_takes_the_largest_allowed_values_and_ints_for_floats():
    config = Bounded.from_dict({"layers": MAX_LAYERS, "width": MAX_WIDTH, "eps": 1})
    assert (config.layers, config.width, config.eps) == (MAX_LAYERS, MAX_WIDTH, 1)
    with pytest.raises(CheckpointError, match=r"section is \[1, 2, 3\], expected a list of 2"):
        Example.from_dict({"section": [1, 2, 3]})


def test_from_file_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"layers": 1001}))
    with pytest.raises(CheckpointError, match=f"{path}: layers is 1001, expected an integer"):
        Bounded.from_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object"):
        Bounded.from_file(path)

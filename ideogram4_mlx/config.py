"""Config dataclasses' base, read from a component's ``config.json``, and the error every
checkpoint file raises.

``BaseConfig.from_dict`` (as mlx-lm's ``BaseModelArgs``) keeps the known fields and checks
each one's type and bounds before any model is built, so an absurd value fails here instead
of allocating. ``header_checks`` lists the values ``weights.checked_config`` compares with
the tensors.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar, NamedTuple, TypeVar

from ideogram4_mlx.errors import InputError


class CheckpointError(InputError):
    """A checkpoint file or directory is missing, damaged or does not match the model."""


class HeaderCheck(NamedTuple):
    """One config.json value against the checkpoint's tensors (a config's ``header_checks``)."""

    field: str  # the config.json field(s) it comes from, for the message
    value: int
    key: str  # a tensor key (repack prefixes stripped); ending in ".": count its ".N." children
    axis: int = 0


def read_json(path: Path) -> dict:
    """A JSON object file (config, index); a missing, malformed or non-object one is a
    ``CheckpointError`` naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: invalid JSON ({e}); restore the file from the original checkpoint"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object ({{...}}), found {json_kind(data)}; "
            "restore the file from the original checkpoint"
        )
    return data


def json_kind(value) -> str:
    """How a JSON value that should have been an object reads, for messages."""
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


Config = TypeVar("Config", bound="BaseConfig")
# Bounds on config.json integers, checked before any model is built, so that an absurd value
# fails here instead of allocating: generous multiples of the real model's (34 and 36 layers,
# 2 VAE resnets per block, 4 blocks; widths up to the 151936-token vocabulary).
MAX_LAYERS = 1000
MAX_WIDTH = 1 << 20


@dataclass(frozen=True)
class BaseConfig:
    """Base of the config dataclasses (as mlx-lm's ``BaseModelArgs``): read from config.json."""

    # Fields that count layers (at most MAX_LAYERS; other integers at most MAX_WIDTH).
    layer_fields: ClassVar[tuple[str, ...]] = ()
    # Key prefixes of repacked files, stripped before ``header_checks`` keys are looked up.
    weight_prefixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls: type[Config], d: dict) -> Config:
        """The known fields of ``d``, type- and bounds-checked (integers 1..MAX_*, floats
        finite and positive); unknown keys are ignored, JSON lists become tuples."""
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in fields(cls):
            if f.name in d:
                limit = MAX_LAYERS if f.name in cls.layer_fields else MAX_WIDTH
                kwargs[f.name] = checked_value(f.name, d[f.name], hints[f.name], limit)
        return cls(**kwargs)

    @classmethod
    def from_file(cls: type[Config], path: Path | str) -> Config:
        path = Path(path)
        config = read_json(path)
        try:
            return cls.from_dict(config)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None

    def to_json(self) -> dict:
        """The fields as config.json holds them (tuples as lists): what a converter writes
        for a component whose source has no config.json (a single DiT file)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
        }

    def header_checks(self) -> list[HeaderCheck]:
        """Values to compare with the tensors a checkpoint holds (``weights.checked_config``)."""
        return []


def checked_value(name: str, value, hint, limit: int):
    """``value`` as a field of type ``hint`` (JSON lists become tuples); a wrong type or an
    out-of-bounds number is a ``CheckpointError`` naming the field."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (hint, *others) = [a for a in typing.get_args(hint) if a is not type(None)]
        if others:
            return value
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not isinstance(value, list | tuple) or not (
            len(value) <= MAX_LAYERS if variadic else len(value) == len(args)
        ):
            size = "a list" if variadic else f"a list of {len(args)}"
            raise CheckpointError(f"{name} is {short(value)}, expected {size}")
        return tuple(
            checked_value(f"{name}[{i}]", v, args[0] if variadic else args[i], limit)
            for i, v in enumerate(value)
        )
    problem = None
    if hint is bool and not isinstance(value, bool):
        problem = "true or false"
    elif hint is str and not isinstance(value, str):
        problem = "a string"
    elif hint is int and (type(value) is not int or not 1 <= value <= limit):
        problem = f"an integer from 1 to {limit}"
    elif hint is float and (
        type(value) not in (int, float) or not (math.isfinite(value) and value > 0)
    ):
        problem = "a finite number above 0"
    if problem:
        raise CheckpointError(f"{name} is {short(value)}, expected {problem}")
    return value


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

"""Caption verifier rules (MODEL_NOTES#caption-verifier-rules)."""

import copy
import json
import time

import pytest

from ideogram4_mlx.caption import (
    MAX_TEXT_FILE_BYTES,
    is_json_prompt,
    read_text_file,
    verify,
    verify_file,
    verify_raw,
)

GOOD = {
    "high_level_description": "A poster that reads 'Café Zürich'.",
    "style_description": {
        "aesthetics": "clean",
        "lighting": "soft daylight",
        "photo": "35mm",
        "medium": "photograph",
        "color_palette": ["#FFAA00", "#112233"],
    },
    "compositional_deconstruction": {
        "background": "a brick wall",
        "elements": [
            {"type": "obj", "bbox": [100, 100, 500, 900], "desc": "a wooden sign"},
            {
                "type": "text",
                "text": "Café Zürich",
                "desc": "painted letters",
                "color_palette": ["#FFFFFF"],
            },
        ],
    },
}


def mutated(fn):
    obj = copy.deepcopy(GOOD)
    fn(obj)
    return verify(obj)


def test_good_caption_has_no_findings():
    assert verify(GOOD) == []
    art = copy.deepcopy(GOOD)
    art["style_description"] = {"aesthetics": "a", "lighting": "b", "medium": "c", "art_style": "d"}
    assert verify(art) == []
    assert verify_raw(json.dumps(GOOD, ensure_ascii=False)) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda o: o.update(extra=1), "root: unknown keys ['extra']"),
        (lambda o: o.update(high_level_description=3), "high_level_description: expected a string"),
        (
            lambda o: o.pop("compositional_deconstruction"),
            "compositional_deconstruction is missing",
        ),
        (lambda o: o["style_description"].update(art_style="x"), "not both"),
        (lambda o: o["style_description"].pop("photo"), "one of photo or art_style"),
        (lambda o: o["style_description"].pop("lighting"), "in this order"),
        (lambda o: o["style_description"].update(color_palette=["#ffaa00"]), "uppercase #RRGGBB"),
        (
            lambda o: o["style_description"].update(color_palette=["#FFFFFF"] * 17),
            "17 colours, at most 16",
        ),
        (lambda o: o["compositional_deconstruction"].pop("background"), "background is missing"),
        (
            lambda o: o["compositional_deconstruction"].update(background=1),
            "background: expected a string",
        ),
        (lambda o: o["compositional_deconstruction"].pop("elements"), "elements is missing"),
        (
            lambda o: o["compositional_deconstruction"].update(elements={}),
            "elements: expected a list",
        ),
        (lambda o: o["compositional_deconstruction"]["elements"][0].pop("type"), "type is missing"),
        (
            lambda o: o["compositional_deconstruction"]["elements"][0].update(type="logo"),
            "is not one of",
        ),
        (
            lambda o: o["compositional_deconstruction"]["elements"][0].update(text="hi"),
            "text: not allowed",
        ),
        (lambda o: o["compositional_deconstruction"]["elements"][1].pop("desc"), "in this order"),
        (
            lambda o: o["compositional_deconstruction"]["elements"][0].update(bbox=[1, 2, 3]),
            "list of 4",
        ),
        (
            lambda o: o["compositional_deconstruction"]["elements"][0].update(bbox=[1, 2, 3.5, 4]),
            "integers",
        ),
        (
            lambda o: o["compositional_deconstruction"]["elements"][0].update(bbox=[0, 0, 1001, 5]),
            "[0, 1000]",
        ),
        (
            lambda o: o["compositional_deconstruction"]["elements"][0].update(
                bbox=[500, 0, 100, 5]
            ),
            "y_min <= y_max",
        ),
        (
            lambda o: o["compositional_deconstruction"]["elements"][1].update(
                color_palette=["#FFFFFF"] * 6
            ),
            "6 colours, at most 5",
        ),
    ],
)
def test_each_rule_reports(change, expected):
    findings = mutated(change)
    assert any(expected in f for f in findings), findings


def test_key_order_is_checked_in_elements_and_composition():
    obj = copy.deepcopy(GOOD)
    el = obj["compositional_deconstruction"]["elements"][1]
    obj["compositional_deconstruction"]["elements"][1] = {
        "type": "text",
        "desc": el["desc"],
        "text": el["text"],
    }
    assert any("in this order" in f for f in verify(obj))
    obj = copy.deepcopy(GOOD)
    comp = obj["compositional_deconstruction"]
    obj["compositional_deconstruction"] = {
        "elements": comp["elements"],
        "background": comp["background"],
    }
    assert any("['background', 'elements']" in f for f in verify(obj))


def test_raw_text_escape_heuristic_and_invalid_json(tmp_path):
    escaped = json.dumps(GOOD, ensure_ascii=True)
    findings = verify_raw(escaped)
    assert len(findings) == 1 and "\\u00e9" in findings[0]
    # literal non-ASCII anywhere: the escapes are deliberate, no warning
    assert verify_raw(escaped.replace("brick", "brück")) == []
    findings = verify_raw("{not json")
    assert len(findings) == 1 and findings[0].startswith("invalid JSON")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(GOOD, ensure_ascii=False), encoding="utf-8")
    assert verify_file(path) == []
    assert verify([1, 2]) == ["root: expected a JSON object, got list"]


def test_is_json_prompt():
    assert is_json_prompt('  {"a": 1}') and not is_json_prompt("a cat in a hat")


def test_verify_caption_command(tmp_path):
    from click.testing import CliRunner

    from ideogram4_mlx.cli import main

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(GOOD, ensure_ascii=False), encoding="utf-8")
    bad.write_text(json.dumps({"high_level_description": 1}), encoding="utf-8")
    result = CliRunner().invoke(main, ["verify-caption", str(good)])
    assert result.exit_code == 0 and "ok" in result.output
    result = CliRunner().invoke(main, ["verify-caption", str(bad)])
    assert result.exit_code == 1 and "compositional_deconstruction is missing" in result.output
    result = CliRunner().invoke(main, ["verify-caption", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "does not exist" in result.output


def bbox_findings(bbox):
    return [f for f in mutated(lambda o: o["compositional_deconstruction"]["elements"][0].update(
        bbox=bbox)) if ".bbox" in f]  # fmt: skip


@pytest.mark.parametrize(
    "bbox, expected",
    [
        ([0, 0, 1000, 1000], None),  # the grid's edges are inside
        ([7, 7, 7, 7], None),  # min == max on both axes
        ([0, 500, 100, 499], "x_min <= x_max"),  # x order alone (y is fine)
        ([500, 0, 499, 100], "y_min <= y_max"),  # y order alone
        ([-1, 0, 10, 10], "[0, 1000]"),
        ([0, 0, 10, 1001], "[0, 1000]"),
        ([False, False, True, True], None),  # booleans pass, as in the official verifier
        ([0, 0, 10.0, 10], "integers"),
        (["0", 0, 10, 10], "integers"),
    ],
)
def test_bbox_boundaries(bbox, expected):
    findings = bbox_findings(bbox)
    if expected is None:
        assert findings == []
    else:
        assert len(findings) == 1 and expected in findings[0], findings


@pytest.mark.parametrize(
    "where, limit",
    [("style", 16), ("element", 5)],
)
def test_palette_size_limits_are_inclusive(where, limit):
    def set_palette(n):
        def change(o):
            target = (
                o["style_description"]
                if where == "style"
                else o["compositional_deconstruction"]["elements"][1]
            )
            target["color_palette"] = ["#ABCDEF"] * n

        return [f for f in mutated(change) if "colour" in f]

    assert set_palette(limit) == []
    assert set_palette(limit + 1) == [
        f"{'style_description' if where == 'style' else 'compositional_deconstruction.elements[1]'}"
        f".color_palette: {limit + 1} colours, at most {limit} allowed"
    ]


def test_deeply_nested_json_is_a_finding_not_a_crash(tmp_path):
    from ideogram4_mlx.caption import MAX_JSON_DEPTH, json_depth

    deep = "[" * 100_000 + "]" * 100_000
    findings = verify_raw(deep)
    assert (
        len(findings) == 1
        and "nests" in findings[0]
        and f"limit is {MAX_JSON_DEPTH}" in findings[0]
    )
    assert json_depth('{"a": "[[[[{{{{", "b": [[1]]}') == 3  # brackets in strings do not count
    assert json_depth('{"a": "\\"[[[["}') == 1  # nor after an escaped quote
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert not any("nests" in f for f in verify_raw(ok))


def test_verify_caption_command_bad_inputs(tmp_path):
    from click.testing import CliRunner

    from ideogram4_mlx.cli import main

    latin1, deep = tmp_path / "latin1.json", tmp_path / "deep.json"
    latin1.write_bytes('{"high_level_description": "caf\u00e9"}'.encode("latin-1"))
    deep.write_text("{" + '"a":[' * 50_000, encoding="utf-8")
    result = CliRunner().invoke(main, ["verify-caption", str(latin1)])
    assert result.exit_code == 1 and "latin1.json is not UTF-8 text" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["verify-caption", str(deep)])
    assert result.exit_code == 1 and "nests" in result.output and "Traceback" not in result.output


def test_text_files_are_read_up_to_a_bound(tmp_path):
    at_limit, over = tmp_path / "at_limit.txt", tmp_path / "over.txt"
    at_limit.write_bytes(b"a" * MAX_TEXT_FILE_BYTES)
    over.write_bytes(b"a" * (MAX_TEXT_FILE_BYTES + 1))
    assert read_text_file(at_limit) == "a" * MAX_TEXT_FILE_BYTES
    for path in (over, "/dev/zero"):
        with pytest.raises(ValueError, match=f"{path} is over 256 KiB"):
            read_text_file(path)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfa fox")
    assert read_text_file(bom, encoding="utf-8-sig") == "a fox"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(.* at byte 3\); save"):
        read_text_file(latin1)
    with pytest.raises(ValueError, match=f"cannot read {tmp_path}: Is a directory"):
        read_text_file(tmp_path)


def test_verify_caption_command_refuses_an_endless_file_quickly():
    from click.testing import CliRunner

    from ideogram4_mlx.cli import main

    start = time.monotonic()
    result = CliRunner().invoke(main, ["verify-caption", "/dev/zero"])
    assert time.monotonic() - start < 5
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = "/dev/zero is over 256 KiB; a prompt or caption is a few KB (is it the right file?)"
    assert result.output == f"Error: {message}\n"

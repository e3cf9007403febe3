"""A memory budget: the first k DiT blocks resident, the rest streamed (``resident_blocks``),
and the planner that picks k for both DiTs from the weight files (``ideogram4_mlx.memory``)."""

import json
import math
import re
import warnings
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_passes_equal
from mlx.utils import tree_flatten

import ideogram4_mlx.transformer as transformer
from ideogram4_mlx.cli import main
from ideogram4_mlx.environment import physical_memory
from ideogram4_mlx.memory import (
    KEEP_FRACTION,
    MAX_LIMIT_BYTES,
    DiTSizes,
    MemoryBudget,
    activation_bytes,
    cache_limit,
    check_limit,
    checkpoint_sizes,
    default_memory_limit,
    denoise_bytes,
    dit_sizes,
    plan_denoise,
    plan_from_sizes,
    set_cache_limit,
)
from ideogram4_mlx.pipeline import PLAN_TOKENS, load
from ideogram4_mlx.transformer import Ideogram4Transformer, TransformerConfig

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"
GB = 10**9
DITS = (("transformer", True), ("unconditional_transformer", False))


def layer_bytes(model):
    return [sum(v.nbytes for _, v in tree_flatten(layer.parameters())) for layer in model.layers]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_partly_resident_dit_equals_resident_dit_pass_after_pass(tiny_checkpoint, dtype, k):
    folder = tiny_checkpoint / "transformer"
    resident = Ideogram4Transformer.from_pretrained(folder, dtype)
    partial = Ideogram4Transformer.from_pretrained(folder, dtype, resident_blocks=k)
    n = len(partial.layers)
    assert (partial.resident_blocks, partial.streamed_blocks) == (k, n - k)
    assert (partial.stream is None) == (k == n)
    held = layer_bytes(partial)
    assert all(b > 0 for b in held[:k]) and all(b == 0 for b in held[k:])

    def kept_as_planned():  # streamed blocks dropped again after the pass, resident kept
        assert layer_bytes(partial) == held

    assert_passes_equal(resident, partial, kept_as_planned)


def test_low_memory_is_zero_resident_blocks_and_k_is_checked(tiny_checkpoint):
    folder = tiny_checkpoint / "transformer"
    low = Ideogram4Transformer.from_pretrained(folder, mx.float32, low_memory=True)
    assert (low.resident_blocks, low.streamed_blocks) == (0, 2)
    default = Ideogram4Transformer.from_pretrained(folder, mx.float32)
    assert (default.streamed_blocks, default.stream) == (0, None)
    many = Ideogram4Transformer.from_pretrained(folder, mx.float32, resident_blocks=99)
    assert (many.resident_blocks, many.streamed_blocks, many.stream) == (2, 0, None)
    with pytest.raises(ValueError, match="resident_blocks must be >= 0.*-1"):
        Ideogram4Transformer.from_pretrained(folder, mx.float32, resident_blocks=-1)
    with pytest.raises(ValueError, match="integer.*1.5"):
        Ideogram4Transformer.from_pretrained(folder, mx.float32, resident_blocks=1.5)
    with pytest.raises(ValueError, match="low_memory.*resident_blocks=1"):
        Ideogram4Transformer.from_pretrained(folder, mx.float32, True, resident_blocks=1)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_dit_sizes_are_what_the_loaded_dits_hold(tiny_checkpoint, dtype):
    for name, text in (("transformer", True), ("unconditional_transformer", False)):
        sizes = dit_sizes(tiny_checkpoint / name, dtype, text)
        model = Ideogram4Transformer.from_pretrained(tiny_checkpoint / name, dtype, text_input=text)
        total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        assert list(sizes.blocks) == layer_bytes(model)
        assert sizes.resident == total - sum(sizes.blocks)
        assert sizes.stream_extra > 0  # fp8 bytes read while a raw block is dequantized


def all_keys(model):
    return {key for key, _ in tree_flatten(model.parameters())}


def blocks_of(keys):
    return {int(key.split(".")[1]) for key in keys if key.startswith("layers.")}


def first_blocks(keys, k):
    """``keys`` outside the blocks and those of blocks 0 .. k - 1."""
    return {key for key in keys if not key.startswith("layers.") or int(key.split(".")[1]) < k}


def record_reads(monkeypatch) -> dict[str, list[set[str]]]:
    """Patch the DiT loader to record, per component folder and load, the parameter keys it
    reads from the files: those it evaluates, whatever its ``resident`` predicate says."""
    reads = {}
    load_component = transformer.load_component

    def reading(model, component_dir, dtype, resident=None):
        evaluated, evaluate = set(), mx.eval

        def eval_and_record(*args):
            evaluated.update(id(a) for _, a in tree_flatten(list(args)))
            return evaluate(*args)

        mx.eval = eval_and_record
        try:
            load_component(model, component_dir, dtype, resident)
        finally:
            mx.eval = evaluate
        keys = {k for k, v in tree_flatten(model.parameters()) if id(v) in evaluated}
        reads.setdefault(Path(component_dir).name, []).append(keys)
        return model

    monkeypatch.setattr(transformer, "load_component", reading)
    return reads


@pytest.mark.parametrize(
    "options, k",
    [({"resident_blocks": k}, k) for k in (0, 1, 2)] + [({"low_memory": True}, 0)],
    ids=["k0", "k1", "k2", "low_memory"],
)
def test_a_partly_resident_dit_reads_exactly_its_first_k_blocks(
    tiny_checkpoint, monkeypatch, options, k
):
    """The budget is honoured by what loads: the files' tensors read at load are the parts
    outside the blocks and blocks 0 .. k - 1, not one block more (the streamed ones are read
    per pass); afterwards exactly those blocks hold weights."""
    dit = Ideogram4Transformer.from_pretrained
    every = {name: all_keys(dit(tiny_checkpoint / name, text_input=text)) for name, text in DITS}
    reads = record_reads(monkeypatch)
    for name, text in DITS:
        folder, keys = tiny_checkpoint / name, every[name]
        reads.clear()
        model = Ideogram4Transformer.from_pretrained(folder, mx.float32, text_input=text, **options)
        assert blocks_of(reads[name][0]) == set(range(k))
        assert reads == {name: [first_blocks(keys, k)]}
        held = layer_bytes(model)
        assert all(b > 0 for b in held[:k]) and all(b == 0 for b in held[k:]), held
        assert model.resident_blocks == k


def test_the_pipeline_under_a_budget_reads_the_planned_blocks_only(tiny_checkpoint, monkeypatch):
    tokens = 300
    sizes = checkpoint_sizes(tiny_checkpoint, mx.float32)
    reads = record_reads(monkeypatch)
    for plan in [(1, 0), (1, 1), (2, 1)]:
        # a little over the plan's estimate: the next block (megabytes) does not fit
        limit = (denoise_bytes(sizes, plan, tokens) + 1000) / GB
        pipe = load(tiny_checkpoint, dtype=mx.float32, memory_limit=limit)
        reads.clear()
        dits = pipe.dits(tokens)
        assert pipe.resident_blocks == plan
        for (name, _), model, k in zip(DITS, dits, plan, strict=True):
            assert [blocks_of(keys) for keys in reads[name]] == [set(range(k))], name
            assert [b > 0 for b in layer_bytes(model)] == [i < k for i in range(2)], name


def file_headers(folder):
    """Every tensor's entry in the headers of a folder's safetensors files (read as JSON)."""
    headers = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            headers.update(json.loads(f.read(int.from_bytes(f.read(8), "little"))))
    headers.pop("__metadata__", None)
    return headers


def converted_block_bytes(folder, dtype):
    """The most file bytes of one block's tensors stored in another dtype than ``dtype`` (each
    such file copy is alive while its block is converted to ``dtype``)."""
    held = {mx.float32: "F32", mx.bfloat16: "BF16"}[dtype]
    per_block = {}
    for key, entry in file_headers(folder).items():
        block = re.match(r"layers\.(\d+)\.", key)
        if block and entry["dtype"] != held:
            start, end = entry["data_offsets"]
            per_block[block[1]] = per_block.get(block[1], 0) + end - start
    return max(per_block.values())


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_estimate_and_plan_follow_from_the_loaded_weights_and_file_bytes(tiny_checkpoint, dtype):
    """The denoising estimate, computed here from what the DiTs hold once loaded and from the
    files' headers: both DiTs' resident parts and kept blocks, plus, for the DiT running, its
    activations and, when it streams, its largest streamed block in memory and that block's
    file bytes being converted. The planner keeps exactly the blocks that fit in it."""
    tokens = 300
    dits = [
        Ideogram4Transformer.from_pretrained(tiny_checkpoint / name, dtype, text_input=text)
        for name, text in DITS
    ]
    converted = [converted_block_bytes(tiny_checkpoint / name, dtype) for name, _ in DITS]
    assert min(converted) > 0

    def expected(plan):
        held, running = 0, 0
        for model, extra, k in zip(dits, converted, plan, strict=True):
            blocks = layer_bytes(model)
            held += sum(v.nbytes for _, v in tree_flatten(model.parameters())) - sum(blocks[k:])
            streams = k < len(blocks)
            stream = max(blocks[k:]) + extra if streams else 0
            running = max(running, stream + activation_bytes(model.config, tokens, streams))
        return held + running

    sizes = checkpoint_sizes(tiny_checkpoint, dtype)
    order = [(0, 0), (1, 0), (1, 1), (2, 1), (2, 2)]  # the planner adds blocks in this order
    for before, plan in zip(order, order[1:], strict=False):  # consecutive pairs
        assert denoise_bytes(sizes, before, tokens) == expected(before), before
        cost = expected(plan)
        assert plan_denoise(sizes, cost, tokens) == (*plan, cost)
        assert plan_denoise(sizes, cost - 1, tokens)[:2] == before


def synthetic_sizes(blocks=34, block=160 * 10**6, resident=230 * 10**6, extra=0):
    config = TransformerConfig()  # the real widths: activation_bytes at full size
    one = DiTSizes(resident, (block,) * blocks, extra, config)
    return one, replace(one, resident=resident // 2)


def test_plan_is_monotone_in_the_limit_and_within_its_own_estimate():
    sizes, tokens = synthetic_sizes(), 5096
    previous = (0, 0)
    for limit in np.linspace(0.5 * GB, 16 * GB, 200):
        plan = plan_from_sizes(sizes, float(limit), tokens)
        assert all(p >= q for p, q in zip(plan, previous, strict=True))
        assert abs(plan[0] - plan[1]) <= 1 or 34 in plan  # shared evenly
        if plan != (0, 0):
            assert denoise_bytes(sizes, plan, tokens) <= limit
        previous = plan
    assert plan_from_sizes(sizes, 1.0, tokens) == (0, 0)  # low memory: the smallest setting
    assert plan_from_sizes(sizes, 1e15, tokens) == (34, 34)


def test_plan_at_the_measured_full_size_budgets():
    # Sizes of the measured 4-bit DiTs (pipeline_memory.json): 0.162 GB per block, 0.454 GB
    # for both DiTs' other parts together.
    sizes = synthetic_sizes(block=162 * 10**6, resident=303 * 10**6)
    plans = [plan_from_sizes(sizes, gb * GB, 5096) for gb in (6, 8, 12, 16)]
    assert plans[-1] == (34, 34)  # 11.5 GB of weights + 2.1 GB of activations fit in 16
    assert 0 < sum(plans[0]) < sum(plans[1]) < sum(plans[2]) < 68
    for gb, plan in zip((6, 8, 12, 16), plans, strict=True):
        assert denoise_bytes(sizes, plan, 5096) <= gb * GB


def test_every_block_resident_uses_the_larger_activation_settings():
    config = TransformerConfig()
    assert activation_bytes(config, 5096, False) > activation_bytes(config, 5096, True)
    sizes = synthetic_sizes(blocks=2, block=10**6, resident=10**6)
    all_in = denoise_bytes(sizes, (2, 2), 5096)
    # Just under "all resident": the planner must stream one block, not round up.
    assert plan_from_sizes(sizes, all_in - 1, 5096) != (2, 2)


def test_activation_estimate_bounds_the_measured_rows():
    rows = json.loads((RESULTS / "pipeline_memory.json").read_text())["rows"]
    captions = {512: 300, 1024: 1000, 2048: 1000}
    for row in rows:
        tokens = (row["side"] // 16) ** 2 + captions[row["side"]]
        estimate = activation_bytes(TransformerConfig(), tokens, row["mode"] == "low-memory")
        assert row["activations"] * GB <= estimate <= 1.4 * row["activations"] * GB, row


def test_check_limit_takes_gb_or_bytes_and_gives_whole_bytes():
    assert check_limit(8) == check_limit(8.0) == 8 * GB
    assert check_limit(0.5) == GB // 2
    assert check_limit(1e-12) == 1  # at least a byte: a positive limit never becomes 0
    assert check_limit(1e6) == MAX_LIMIT_BYTES  # the largest taken, in GB
    assert check_limit(3 * GB + 0.4, "bytes") == 3 * GB
    assert check_limit(MAX_LIMIT_BYTES, "bytes") == MAX_LIMIT_BYTES
    estimate = denoise_bytes(synthetic_sizes(), (3, 2), 5096)
    assert check_limit(estimate / GB) == estimate  # GB of an estimate: that estimate, exactly


# Not finite, not > 0, over 10^6 GB (8e9 GB: bytes given as GB), or no number.
BAD_LIMITS = [0, 0.0, -1, -8e9, math.nan, math.inf, -math.inf, 1e6 + 1, 8e9, "8", None, True]


@pytest.mark.parametrize("limit", BAD_LIMITS)
def test_a_bad_limit_is_an_error_naming_it(tiny_checkpoint, limit):
    named = f"memory limit.*{re.escape(repr(limit))}"
    with pytest.raises(ValueError, match=named):
        check_limit(limit)
    if limit is not None and limit != 0:  # None: the machine's budget; 0: low memory
        with pytest.raises(ValueError, match=named):
            load(tiny_checkpoint, memory_limit=limit)


def test_a_limit_of_0_streams_every_block(tiny_checkpoint):
    """PipelineOptions fold --low-memory into the limit: 0 (GB) plans no resident block."""
    for pipe in load(tiny_checkpoint, memory_limit=0), load(tiny_checkpoint, low_memory=True):
        assert pipe.options.low_memory and pipe.plan(PLAN_TOKENS) == (0, 0)
    assert load(tiny_checkpoint, memory_limit=1e6).plan(PLAN_TOKENS) != (0, 0)


@pytest.mark.parametrize("limit", [0, -1, math.nan, math.inf, MAX_LIMIT_BYTES + 1, "8", True])
def test_a_budget_checks_its_limit_in_bytes(tiny_checkpoint, limit):
    with pytest.raises(ValueError, match=f"memory limit.*{re.escape(repr(limit))}"):
        MemoryBudget(tiny_checkpoint, mx.float32, limit)


def test_the_budget_plans_from_the_checkpoint_and_sets_the_cache_limit(tiny_checkpoint):
    previous = mx.set_cache_limit(0)
    try:
        assert MemoryBudget(tiny_checkpoint, mx.float32, 10**12).plan(100) == (2, 2)
        estimate = denoise_bytes(checkpoint_sizes(tiny_checkpoint, mx.float32), (2, 2), 100)
        assert mx.set_cache_limit(0) == 10**12 - estimate
        assert MemoryBudget(tiny_checkpoint, mx.float32, 1000).plan(100) == (0, 0)
        assert mx.set_cache_limit(0) == 0  # the plan is over the limit: nothing cached
        low = MemoryBudget(tiny_checkpoint, mx.float32, 10**12, low_memory=True)
        assert low.plan(100) == (0, 0) and low.streamed((0, 0)) == 4
        with pytest.raises(ValueError, match="tokens must be an integer > 0, got 0"):
            MemoryBudget(tiny_checkpoint, mx.float32, 10**12).plan(0)
    finally:
        mx.set_cache_limit(previous)
    plan = plan_denoise(checkpoint_sizes(tiny_checkpoint, mx.float32), 1e12, 100)
    sizes = tuple(
        dit_sizes(tiny_checkpoint / name, mx.float32, text)
        for name, text in (("transformer", True), ("unconditional_transformer", False))
    )
    assert plan == (2, 2, denoise_bytes(sizes, (2, 2), 100))


def test_default_limit_and_cache_limit(tiny_checkpoint):
    limit = default_memory_limit()
    if not mx.metal.is_available():
        assert limit == int(KEEP_FRACTION * physical_memory())
    assert 0 < limit <= physical_memory()
    assert MemoryBudget(tiny_checkpoint, mx.float32).limit_bytes == limit
    assert cache_limit(8 * GB, 6 * GB) == 2 * GB
    assert cache_limit(8 * GB, 9 * GB) == 0
    previous = set_cache_limit(123 * 10**6)
    try:
        assert set_cache_limit(previous) == 123 * 10**6
    finally:
        mx.set_cache_limit(previous)
    with pytest.raises(ValueError, match="cache limit.*-1"):
        set_cache_limit(-1)


def test_pipeline_under_a_budget_makes_the_same_image(tiny_checkpoint):
    kwargs = {"width": 256, "height": 256, "num_steps": 2, "seed": 3}
    caption = '{"high_level_description":"a blue door"}'
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = load(tiny_checkpoint, dtype=mx.float32, keep_in_memory=False)
        image = want.generate(caption, **kwargs)
        tokens = (256 // 16) ** 2 + want.encode(caption).shape[1]
        sizes = tuple(
            dit_sizes(tiny_checkpoint / name, mx.float32, text)
            for name, text in (("transformer", True), ("unconditional_transformer", False))
        )
        for plan in [(1, 1), (1, 0)]:
            limit = denoise_bytes(sizes, plan, tokens) / 1e9
            pipe = load(tiny_checkpoint, dtype=mx.float32, memory_limit=limit)
            got = pipe.generate(caption, **kwargs)
            assert pipe.resident_blocks == plan
            np.testing.assert_array_equal(got.latents, image.latents)
    with pytest.raises(ValueError, match="low_memory.*memory_limit"):
        load(tiny_checkpoint, low_memory=True, memory_limit=8)


def test_cli_memory_limit(tiny_checkpoint, tmp_path):
    out = tmp_path / "budget.png"
    args = ["generate", "--model", str(tiny_checkpoint), "--dtype", "float32", "--steps", "1",
            "--width", "256", "--height", "256", "--prompt", "a door",
            "--output", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--memory-limit", "0.001"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, [*args, "--memory-limit", "-1", "--force"])
    assert result.exit_code != 0 and "--memory-limit" in result.output
    result = CliRunner().invoke(main, [*args, "--memory-limit", "1", "--low-memory", "--force"])
    assert result.exit_code != 0 and "give --low-memory or --memory-limit" in result.output

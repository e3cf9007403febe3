"""Sampler: the time-grid test vectors (MODEL_NOTES#time-grid-test-vectors), presets, guidance
order, CFG, Euler."""

import mlx.core as mx
import numpy as np
import pytest

from ideogram4_mlx.sampler import (
    PRESETS,
    T_MAX,
    T_MIN,
    KnownLatents,
    denoise,
    get_preset,
    guidance_from_index_order,
    model_times,
    resolve_schedule,
    time_grid,
)

# MODEL_NOTES#time-grid-test-vectors, float32 results of the formula at 1024x1024.
DEFAULT_20 = [
    0.99944723,
    0.8989259,
    0.82485133,
    0.75410205,
    0.68561327,
    0.61944896,
    0.55590367,
    0.49529105,
    0.43787524,
    0.38384971,
    0.33333334,
    0.28637519,
    0.24296267,
    0.20303087,
    0.16647092,
    0.13313678,
    0.10284696,
    0.075375475,
    0.050408974,
    0.027341142,
    0.00012339458,
]
TURBO_12 = [
    0.99944723,
    0.77330929,
    0.62242186,
    0.49680251,
    0.39189005,
    0.30472505,
    0.23269653,
    0.17344631,
    0.12488958,
    0.085215576,
    0.052843243,
    0.026252594,
    0.00012339458,
]
QUALITY_48 = [
    0.99944723,
    0.91389149,
    0.87038302,
    0.83313823,
    0.79920679,
    0.76747268,
    0.73737645,
    0.70859325,
    0.68091613,
    0.65420455,
    0.62835813,
    0.6033023,
    0.57897997,
    0.55534595,
    0.53236377,
    0.51000303,
    0.4882381,
    0.46704683,
    0.44640961,
    0.42630893,
    0.40672892,
    0.38765475,
    0.36907271,
    0.35096973,
    0.33333334,
    0.3161515,
    0.29941243,
    0.28310466,
    0.26721677,
    0.25173736,
    0.23665509,
    0.22195837,
    0.20763536,
    0.193674,
    0.18006155,
    0.16678458,
    0.15382876,
    0.14117825,
    0.12881535,
    0.11671972,
    0.104867,
    0.093226895,
    0.081759959,
    0.070411243,
    0.059098184,
    0.047682773,
    0.035893574,
    0.02301334,
    0.00012339458,
]
DEFAULT_20_T_BF16 = [
    1.23023987e-4,
    0.02734375,
    0.0502929688,
    0.0751953125,
    0.103027344,
    0.1328125,
    0.166015625,
    0.203125,
    0.243164062,
    0.287109375,
    0.333984375,
    0.384765625,
    0.4375,
    0.49609375,
    0.5546875,
    0.62109375,
    0.6875,
    0.75390625,
    0.82421875,
    0.8984375,
]


@pytest.mark.parametrize(
    "preset, expected",
    [("V4_DEFAULT_20", DEFAULT_20), ("V4_TURBO_12", TURBO_12), ("V4_QUALITY_48", QUALITY_48)],
)
def test_time_grid_matches_spec_vectors(preset, expected):
    p = get_preset(preset)
    grid = time_grid(p.num_steps, 1024, 1024, p.mu, p.std)
    assert grid.dtype == np.float32 and grid.shape == (p.num_steps + 1,)
    # The vectors are 8-9 significant digits of float32 values; 1e-7 absolute is below one float32
    # ulp at 0.5-1.0 (6e-8..1.2e-7) plus print rounding (MODEL_NOTES#time-grid-test-vectors).
    np.testing.assert_allclose(grid, np.array(expected, np.float32), atol=1e-7, rtol=0)


def test_grid_endpoints_and_midpoint():
    assert np.float32(T_MIN) == np.float32(1.2339457598623172e-4)
    assert np.float32(T_MAX) == np.float32(0.9994472213630764)
    grid = time_grid(2, 1024, 1024, 0.0, 1.75)  # u = 0.5 in the middle: S = 1 - sigmoid(ln 2)
    assert grid[1] == np.float32(1 / 3)
    grid = time_grid(4, 512, 512, 0.0, 1.0)  # at 512^2 the mean is mu: S(0.5) = 1/2
    assert grid[2] == np.float32(0.5)


def test_strength_compresses_the_grid_onto_the_later_times():
    """MODEL_NOTES#image-to-image: u = linspace(0, s, N + 1); all N steps between S(s) and t_max."""
    p = get_preset("V4_DEFAULT_20")
    full = time_grid(20, 1024, 1024, p.mu, p.std)
    np.testing.assert_array_equal(time_grid(20, 1024, 1024, p.mu, p.std, 1.0), full)
    half = time_grid(20, 1024, 1024, p.mu, p.std, 0.5)
    assert half.shape == (21,) and half[0] == np.float32(T_MAX)
    assert half[-1] == np.float32(1 / 3)  # S(0.5) at 1024^2, mu 0: 1 - sigmoid(ln 2)
    assert (np.diff(half) < 0).all()  # still from t_max down, strictly
    # every u of the compressed grid is a point of the full curve: S_s(i) = S(s * i / N)
    np.testing.assert_allclose(half[::2], time_grid(10, 1024, 1024, p.mu, p.std, 0.5)[:])
    np.testing.assert_allclose(half[10], time_grid(4, 1024, 1024, p.mu, p.std)[1], atol=1e-7)
    schedule = resolve_schedule(1024, 1024, strength=0.5)
    assert schedule.strength == 0.5 and schedule.start_time == np.float32(1 / 3)
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="strength must be in"):
            time_grid(4, 512, 512, 0.0, 1.0, bad)


def test_known_latents_pin_the_kept_tokens():
    x0 = mx.array(np.full((1, 3, 2), 2.0, np.float32))
    noise = mx.array(np.full((1, 3, 2), -1.0, np.float32))
    mask = mx.array(np.array([1.0, 0.0, 0.5], np.float32).reshape(1, 3, 1))
    known = KnownLatents(x0, noise, mask)
    z = mx.array(np.full((1, 3, 2), 7.0, np.float32))
    out = np.array(known.blend(z, 0.25))  # known = 0.25 * 2 + 0.75 * -1 = -0.25
    np.testing.assert_array_equal(out[0, :, 0], [7.0, -0.25, 0.5 * 7 + 0.5 * -0.25])
    np.testing.assert_array_equal(np.array(known.blend(z, 1.0))[0, 1], [2.0, 2.0])  # x0 itself
    # in the loop: kept tokens follow the input after every step and end as x0 exactly
    schedule = resolve_schedule(512, 512, guidance_schedule=[1.0], num_steps=3)
    seen = []
    velocity = lambda z, t: mx.ones_like(z)  # noqa: E731
    final = denoise(noise, schedule, velocity, velocity, lambda i, n, z: seen.append(z), known)
    for step, z in enumerate(seen[:-1]):
        t = schedule.grid[schedule.num_steps - 1 - step]
        np.testing.assert_allclose(np.array(z)[0, 1], 2 * t - (1 - t), rtol=1e-6)
    np.testing.assert_array_equal(np.array(final)[0, 1], [2.0, 2.0])


def test_model_times_in_bf16_are_the_spec_values():
    p = get_preset("V4_DEFAULT_20")
    t = model_times(time_grid(p.num_steps, 1024, 1024, p.mu, p.std))
    t_bf16 = np.array(mx.array(t).astype(mx.bfloat16).astype(mx.float32))
    np.testing.assert_allclose(t_bf16, DEFAULT_20_T_BF16, rtol=1e-8)


def test_presets_in_both_orders():
    # chronological (ours) and the official loop-index order (entry 0 = last step)
    official = {
        "V4_QUALITY_48": ([3.0] * 3 + [7.0] * 45, 0.0, 1.5),
        "V4_DEFAULT_20": ([3.0] * 2 + [7.0] * 18, 0.0, 1.75),
        "V4_TURBO_12": ([3.0] + [7.0] * 11, 0.5, 1.75),
    }
    assert set(PRESETS) == set(official)
    for name, (index_order, mu, std) in official.items():
        p = get_preset(name)
        assert p.guidance == guidance_from_index_order(index_order)
        assert (p.num_steps, p.mu, p.std) == (len(index_order), mu, std)
    assert get_preset("V4_DEFAULT_20").guidance[:18] == (7.0,) * 18
    assert get_preset("V4_DEFAULT_20").guidance[18:] == (3.0, 3.0)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="V4_DEFAULT_20"):
        get_preset("V4_FAST")


def test_resolve_schedule_overrides():
    s = resolve_schedule(1024, 1024, "V4_TURBO_12", num_steps=5, mu=0.1, std=2.0)
    assert s.num_steps == 5 and s.guidance == (7.0,) * 4 + (3.0,)
    np.testing.assert_array_equal(s.grid, time_grid(5, 1024, 1024, 0.1, 2.0))
    assert resolve_schedule(512, 512, guidance_schedule=[4.0]).guidance == (4.0,) * 20
    with pytest.raises(ValueError, match="3 entries but num_steps is 20"):
        resolve_schedule(512, 512, guidance_schedule=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="std must be > 0"):
        resolve_schedule(512, 512, std=0)


def reference_loop(noise, grid, guidance_index_order, cond, uncond):
    """The official loop of MODEL_NOTES#denoising-loop (loop index i from N-1 down to 0)."""
    z = noise.astype(np.float32)
    n = len(guidance_index_order)
    for i in range(n - 1, -1, -1):
        t_cur = grid[i + 1]
        g = np.float32(guidance_index_order[i])
        v = cond(z, t_cur)
        if abs(g - 1) > 1e-6:
            v = g * v + (np.float32(1) - g) * uncond(z, t_cur)
        z = z + v * (grid[i] - grid[i + 1])
    return z


def test_denoise_matches_the_official_loop_and_skips_uncond_at_g1():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, 6, 4)).astype(np.float32)
    a, b = rng.standard_normal((2, 1, 6, 4)).astype(np.float32)

    def cond_np(z, t):
        return np.float32(0.5) * z + np.float32(t) * a

    def uncond_np(z, t):
        return np.float32(-0.25) * z + b

    schedule = resolve_schedule(512, 512, guidance_schedule=[7.0, 1.0, 5.0, 1.0, 3.0], num_steps=5)
    calls = {"cond": [], "uncond": []}

    def cond(z, t):
        calls["cond"].append(t)
        return mx.array(cond_np(np.array(z), np.float32(t)))

    def uncond(z, t):
        calls["uncond"].append(t)
        return mx.array(uncond_np(np.array(z), np.float32(t)))

    seen = []
    out = denoise(mx.array(noise), schedule, cond, uncond, callback=lambda s, n, z: seen.append(s))
    expected = reference_loop(
        noise, schedule.grid, guidance_from_index_order(schedule.guidance), cond_np, uncond_np
    )
    np.testing.assert_allclose(np.array(out), expected, rtol=1e-6, atol=1e-6)
    assert calls["cond"] == [float(t) for t in model_times(schedule.grid)]
    assert len(calls["uncond"]) == 3  # the two g == 1 steps skip it
    assert seen == [0, 1, 2, 3, 4]


def test_denoise_ends_at_t_max_not_one():
    """With v = x0 - noise exactly, z_t = t*x0 + (1-t)*noise; the loop must stop at t_max."""
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, 1, 8, 3)).astype(np.float32)
    schedule = resolve_schedule(1024, 1024, "V4_TURBO_12")
    out = denoise(
        mx.array(noise),
        schedule,
        lambda z, t: mx.array(x0 - noise),
        lambda z, t: mx.array(x0 - noise),
    )
    # starts at t_min: z_0 = noise means the path is offset by -t_min*(x0 - noise)
    t_span = float(schedule.grid[0] - schedule.grid[-1])
    np.testing.assert_allclose(np.array(out), noise + t_span * (x0 - noise), rtol=1e-5, atol=1e-5)

"""Central DP (DP-FedAvg: clip, equal weights, Gaussian noise on the sum; adaptive clipping)
and the local-DP helper, on hand-computed values and against the seeded noise they must add.
"""

from __future__ import annotations

import math

import pytest
import torch
from fedstream.server.strategies import InMemoryUpload, StrategyError, build_strategy
from fedstream.server.strategies.privacy import clip_factor, local_dp, update_norm

from tests.unit.strategy_cases import run_round


def test_clip_factor_brings_a_norm_down_to_the_clip_norm_only() -> None:
    assert clip_factor(0.5, 1.0) == 1.0
    assert clip_factor(4.0, 1.0) == 0.25


def test_update_norm_spans_every_floating_tensor_and_skips_counters() -> None:
    delta = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0]).half(), "n": torch.tensor(100)}
    assert update_norm(delta) == 5.0


def test_central_dp_without_noise_is_the_equal_weight_mean_of_clipped_updates() -> None:
    # Norms 5 and 0.5 with C = 1: [3, 4] -> [0.6, 0.8]; [0.3, 0.4] unchanged.
    # Equal weights whatever the claims: ([0.6, 0.8] + [0.3, 0.4]) / 2 = [0.45, 0.6].
    model = {"w": torch.zeros(2, dtype=torch.float64), "n": torch.tensor(7)}
    staged = [
        InMemoryUpload(
            "a", 1, {"w": torch.tensor([3.0, 4.0], dtype=torch.float64), "n": torch.tensor(5)}
        ),
        InMemoryUpload(
            "b", 1000, {"w": torch.tensor([0.3, 0.4], dtype=torch.float64), "n": torch.tensor(5)}
        ),
    ]
    outcome = run_round(build_strategy("fedavg", {"dp_clip_norm": "1"}), model, staged)
    torch.testing.assert_close(model["w"], torch.tensor([0.45, 0.6], dtype=torch.float64))
    assert model["n"].item() == 7  # counters are not private: left unchanged
    assert outcome.info["dp_unclipped"] == 1 and outcome.info["dp_clients"] == 2


def test_central_dp_adds_noise_of_sigma_c_to_the_sum_then_divides_by_k() -> None:
    clip, sigma, seed = 2.0, 0.7, 123
    staged = [
        InMemoryUpload("a", 1, {"w": torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)}),
        InMemoryUpload("b", 1, {"w": torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)}),
    ]
    model = {"w": torch.zeros(3, dtype=torch.float64)}
    options = {"dp_clip_norm": str(clip), "dp_noise_multiplier": str(sigma), "dp_seed": str(seed)}
    outcome = run_round(build_strategy("fedavg", options), model, staged)
    noise = torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want = (torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64) + sigma * clip * noise) / 2
    torch.testing.assert_close(model["w"], want, rtol=0, atol=1e-15)
    assert outcome.info["dp_noise_stddev"] == pytest.approx(sigma * clip)


def test_central_dp_noise_has_the_stated_standard_deviation() -> None:
    # One client sending zeros: the model moves by noise / 1 only.
    model = {"w": torch.zeros(200_000)}
    options = {"dp_clip_norm": "0.5", "dp_noise_multiplier": "2", "dp_seed": "1"}
    run_round(
        build_strategy("fedavg", options),
        model,
        [InMemoryUpload("a", 1, {"w": torch.zeros(200_000)})],
    )
    assert model["w"].std().item() == pytest.approx(1.0, rel=0.01)
    assert abs(model["w"].mean().item()) < 0.01


def test_adaptive_clipping_moves_the_clip_norm_geometrically_toward_the_quantile() -> None:
    # C = 1; norms 0.5, 2, 3, 4: one of four unclipped (no noise: sigma = 0).
    # C <- 1 * exp(-0.2 * (1/4 - 0.5)) = exp(0.05)
    options = {"dp_clip_norm": "1", "dp_adaptive": "true"}
    strategy = build_strategy("fedavg", options)
    staged = [
        InMemoryUpload(f"c{i}", 1, {"w": torch.tensor([n])})
        for i, n in enumerate([0.5, 2.0, 3.0, 4.0])
    ]
    outcome = run_round(strategy, {"w": torch.zeros(1)}, staged)
    assert outcome.info["dp_next_clip_norm"] == pytest.approx(math.exp(0.05))
    nxt = [InMemoryUpload("a", 1, {"w": torch.tensor([10.0])})]
    second = run_round(strategy, {"w": torch.zeros(1)}, nxt, 2)
    assert second.info["dp_clip_norm"] == pytest.approx(math.exp(0.05))


def test_adaptive_clipping_splits_the_noise_between_update_and_count() -> None:
    # z = 1, count stddev 2: z_update = (1 - 1/16)^(-1/2)
    options = {
        "dp_clip_norm": "1",
        "dp_noise_multiplier": "1",
        "dp_adaptive": "true",
        "dp_count_stddev": "2",
        "dp_seed": "0",
    }
    outcome = run_round(
        build_strategy("fedavg", options),
        {"w": torch.zeros(1)},
        [InMemoryUpload("a", 1, {"w": torch.zeros(1)})],
    )
    assert outcome.info["dp_noise_stddev"] == pytest.approx((1 - 1 / 16) ** -0.5)


def test_adaptive_clipping_with_too_little_count_noise_is_refused_naming_the_option() -> None:
    options = {"dp_clip_norm": "1", "dp_noise_multiplier": "1", "dp_adaptive": "true"}
    model = {"w": torch.zeros(1)}
    with pytest.raises(StrategyError, match="option 'dp_count_stddev' \\(0.2\\)"):
        run_round(
            build_strategy("fedavg", options),
            model,
            [InMemoryUpload(f"c{i}", 1, {"w": torch.ones(1)}) for i in range(4)],
        )
    assert model["w"].item() == 0.0


def test_dp_options_need_a_clip_norm() -> None:
    with pytest.raises(StrategyError, match="dp_noise_multiplier need option 'dp_clip_norm'"):
        build_strategy("fedadam", {"dp_noise_multiplier": "1"})


# ---- local DP -----------------------------------------------------------------------------


def test_local_dp_without_noise_clips_to_the_norm() -> None:
    delta = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(9)}
    private = local_dp(delta, 1.0, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(private["w"], torch.tensor([0.6, 0.8]))
    assert private["n"].item() == 9
    assert delta["w"].tolist() == [3.0, 4.0]  # pure: the input is untouched


def test_local_dp_adds_seeded_noise_of_sigma_c() -> None:
    delta = {"w": torch.tensor([0.1, 0.2], dtype=torch.float64)}
    private = local_dp(delta, 1.0, 0.5, torch.Generator().manual_seed(3))
    noise = torch.randn(2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(private["w"], delta["w"] + 0.5 * noise, rtol=0, atol=1e-15)


def test_local_dp_refuses_a_bad_clip_norm() -> None:
    with pytest.raises(StrategyError, match="clip_norm must be positive"):
        local_dp({"w": torch.ones(1)}, 0.0, 1.0, torch.Generator())

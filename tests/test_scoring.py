"""Stop-step selection on synthetic curves with a known answer."""

from __future__ import annotations

import pytest

from contract.scoring import best_step, min_max_scale, weighted_scores
from contract.spec import STUDY_RANGES

STEPS = range(0, 1001, 100)


def rise_then_collapse() -> dict[str, dict[int, float]]:
    """Similarity rises to a plateau by step 600; diversity holds, then collapses after 500."""
    similarity = {s: min(0.85, 0.45 + 0.4 * s / 600) for s in STEPS}
    diversity = {s: 0.75 if s <= 500 else 0.75 - 0.05 * (s - 500) / 100 for s in STEPS}
    return {"similarity": similarity, "diversity": diversity}


def test_min_max_scale_clips() -> None:
    assert min_max_scale(0.65, 0.45, 0.85) == pytest.approx(0.5)
    assert min_max_scale(0.2, 0.45, 0.85) == 0.0
    assert min_max_scale(0.95, 0.45, 0.85) == 1.0


def test_best_step_balances_rise_and_collapse() -> None:
    weights = {"similarity": 1.0, "diversity": 0.5}
    scores = weighted_scores(rise_then_collapse(), weights, STUDY_RANGES)
    # At 500: sim 0.45+0.4*5/6 → scaled 5/6, div scaled 1 → (5/6 + 0.5)/1.5 = 0.8889.
    # At 600: sim scaled 1, div 0.70 → scaled 0.8 → (1 + 0.4)/1.5 = 0.9333: the best.
    # At 700: sim 1, div 0.65 → 0.6 → (1 + 0.3)/1.5 = 0.8667.
    assert scores[500] == pytest.approx((5 / 6 + 0.5) / 1.5)
    assert best_step(scores) == (600, pytest.approx(1.4 / 1.5))


def test_weights_move_the_best_step() -> None:
    curves = rise_then_collapse()
    # Diversity alone: flat at its best until 500, so the tie goes to the earliest step.
    assert best_step(weighted_scores(curves, {"diversity": 1.0}, STUDY_RANGES))[0] == 0
    # Similarity alone: the plateau starts at 600.
    assert best_step(weighted_scores(curves, {"similarity": 1.0}, STUDY_RANGES))[0] == 600


def test_only_steps_with_every_weighted_metric_count() -> None:
    curves = {"similarity": {0: 0.5, 10: 0.6, 20: 0.7}, "diversity": {0: 0.6, 10: 0.6}}
    scores = weighted_scores(curves, {"similarity": 1, "diversity": 1}, STUDY_RANGES)
    assert sorted(scores) == [0, 10]


def test_nothing_to_choose_is_an_error() -> None:
    with pytest.raises(ValueError, match="no evaluated step"):
        best_step({})
    with pytest.raises(ValueError, match="weight must be > 0"):
        weighted_scores({}, {"similarity": 0.0}, STUDY_RANGES)


def test_collapse_is_the_first_drop_beyond_the_threshold_from_the_running_best() -> None:
    from contract.scoring import collapse_step, first_collapse

    diversity = rise_then_collapse()["diversity"]  # scaled: 1.0 to 500, then -0.2 per 100
    assert collapse_step(diversity, STUDY_RANGES["diversity"], threshold=0.3) == 700
    assert collapse_step(diversity, STUDY_RANGES["diversity"], threshold=0.1) == 600
    assert collapse_step(diversity, STUDY_RANGES["diversity"], threshold=0.25) == 700
    assert collapse_step(diversity, STUDY_RANGES["diversity"], threshold=1.0) is None
    # Rises and plateaus never collapse; a dip that is regained still counts where it happened.
    assert collapse_step({0: 0.3, 1: 0.5, 2: 0.5}, (0.0, 1.0), threshold=0.1) is None
    assert collapse_step({0: 0.5, 1: 0.2, 2: 0.6}, (0.0, 1.0), threshold=0.1) == 1
    histories = {**rise_then_collapse(), "aesthetics": {0: 0.7, 100: 0.3, 200: 0.3}}
    assert first_collapse(histories, ["aesthetics", "diversity"], STUDY_RANGES, 0.3) == (
        100,
        "aesthetics",
    )
    assert first_collapse(histories, ["similarity"], STUDY_RANGES, 0.3) is None


def test_steps_per_image_fit_is_least_squares_through_the_origin() -> None:
    from selection.report import fit_steps_per_image

    # The study's finding for men: about 120 steps per image.
    assert fit_steps_per_image([(2, 240), (4, 480), (8, 960)]) == pytest.approx(120.0)
    # minimise Σ (s − k n)²  →  k = Σ n s / Σ n² = (100 + 600) / (1 + 4) = 140.
    assert fit_steps_per_image([(1, 100), (2, 300)]) == pytest.approx(140.0)
    assert fit_steps_per_image([]) is None

"""The verdict rules on synthetic per-seed effects: every outcome, the margin, one seed."""

from __future__ import annotations

import pytest

from normlab.experiments.verdict import (
    OUTCOMES,
    Verdict,
    accuracy_margin,
    all_of,
    effect_verdict,
    resolution,
    spread,
)


@pytest.mark.parametrize(("effects", "margin", "outcome"), [
    ([0.05, 0.04, 0.03], 0.01, "reproduced"),          # every seed beyond the margin
    ([0.05, 0.04], 0.01, "reproduced"),                # two seeds are enough
    ([-0.02, 0.0, -0.01], 0.01, "not reproduced"),     # no seed shows the effect
    ([0.0, 0.0, 0.0], 0.01, "not reproduced"),         # exactly none
    ([0.05, 0.04, -0.01], 0.01, "inconclusive"),       # seeds disagree
    ([0.05, 0.04, 0.01], 0.01, "inconclusive"),        # one seed only at the margin
    ([0.005, 0.008, 0.009], 0.01, "inconclusive"),     # all inside the margin
    ([0.30], 0.01, "inconclusive"),                    # one seed: huge, still undecided
    ([-0.30], 0.01, "inconclusive"),                   # one seed the other way: same
])
def test_effect_verdict_outcomes(effects: list[float], margin: float, outcome: str) -> None:
    verdict = effect_verdict(effects, margin, what="the effect")
    assert verdict.outcome == outcome
    assert verdict.text.startswith(f"Verdict: {outcome} (the effect: ")
    assert f"over {len(effects)} seed" in verdict.evidence


@pytest.mark.parametrize(("effect", "margin", "outcome"), [
    (0.011, 0.01, "reproduced"),
    (0.010, 0.01, "inconclusive"),   # equal to the margin is not more than it
    (0.011, 0.02, "inconclusive"),   # a larger margin turns the same numbers undecided
])
def test_margin_is_respected(effect: float, margin: float, outcome: str) -> None:
    assert effect_verdict([effect] * 3, margin, what="x").outcome == outcome


@pytest.mark.parametrize(("min_seeds", "seeds", "outcome"), [
    (2, 1, "inconclusive"), (2, 2, "reproduced"), (3, 2, "inconclusive"), (3, 3, "reproduced"),
])
def test_min_seeds(min_seeds: int, seeds: int, outcome: str) -> None:
    verdict = effect_verdict([0.1] * seeds, 0.01, what="x", min_seeds=min_seeds)
    assert verdict.outcome == outcome
    assert ("cannot show the spread" in verdict.evidence) == (outcome == "inconclusive")


@pytest.mark.parametrize(("test_size", "margin"), [
    (359, 0.01),       # digits: two images are 0.56 points, so the 1-point floor rules
    (100, 0.02),       # two examples of 100 are 2 points
    (10_000, 0.01),
    (50, 0.04),
])
def test_accuracy_margin_is_two_examples_and_at_least_a_point(test_size: int,
                                                              margin: float) -> None:
    assert accuracy_margin(test_size) == pytest.approx(margin)
    assert accuracy_margin(test_size) >= 2 * resolution(test_size)


def test_rule_and_evidence_name_the_numbers() -> None:
    verdict = effect_verdict([120.0, 80.0], 50, what="steps saved", unit="steps", scale=1.0,
                             digits=0)
    assert verdict.outcome == "reproduced"
    assert "+80 .. +120 steps over 2 seeds, margin 50" in verdict.evidence
    assert "exceeds 50 steps on every seed" in verdict.rule
    assert verdict.to_dict() == {"outcome": "reproduced", "rule": verdict.rule,
                                 "evidence": verdict.evidence}


A, N, I = (Verdict(o, "r", "e") for o in OUTCOMES)


@pytest.mark.parametrize(("parts", "outcome"), [
    ([A, A], "reproduced"),
    ([A, N], "not reproduced"),
    ([I, N], "not reproduced"),
    ([A, I], "inconclusive"),
    ([I], "inconclusive"),
])
def test_all_of(parts: list[Verdict], outcome: str) -> None:
    combined = all_of(parts)
    assert combined.outcome == outcome
    assert combined.rule.startswith("every part must hold: (1) r")


@pytest.mark.parametrize("bad", [
    lambda: effect_verdict([], 0.01, what="x"),
    lambda: effect_verdict([0.1], -0.01, what="x"),
    lambda: Verdict("probably", "r", "e"),
    lambda: all_of([]),
])
def test_invalid_input_is_refused(bad) -> None:  # noqa: ANN001
    with pytest.raises(ValueError):
        bad()


def test_spread() -> None:
    assert spread([0.9, 0.95, 0.92]) == pytest.approx(0.05) and spread([0.9]) == 0.0


def test_an_effect_equal_to_the_margin_does_not_pass_by_rounding() -> None:
    """0.311 - 0.301 is 0.01000000000000001 in floating point: 20 of 2,000 images, the
    margin itself, is not *more* than the margin."""
    from normlab.experiments.verdict import effect_verdict

    effect = 0.311 - 0.301
    assert effect > 0.01  # the rounding the rule must not be fooled by
    assert effect_verdict([effect, 0.05, 0.05], 0.01, what="x").outcome == "inconclusive"
    assert effect_verdict([0.0101, 0.05, 0.05], 0.01, what="x").outcome == "reproduced"


def test_the_recorded_command_names_a_backend_other_than_auto() -> None:
    from normlab.experiments.lab import command_line

    assert "--backend torch" in command_line("init", seed=0, budget=1, quick=False,
                                             backend="torch")
    assert "--backend" not in command_line("init", seed=0, budget=1, quick=False)

"""Each experiment's decision rule on synthetic per-seed runs: the right effect, sign and
sweep point are tested, so a rule cannot silently favour its claim."""

from __future__ import annotations

from typing import Any

import pytest

from normlab.experiments.catalog import (
    batch_size_verdict,
    bn_paper_verdict,
    init_verdict,
    learning_rate_verdict,
    placement_verdict,
)

MARGIN = 0.01


def acc(*finals: float) -> list[dict[str, Any]]:
    """Per-seed runs with these final test accuracies."""
    return [{"final_test_acc": a} for a in finals]


def curve(steps_to: list[int | None], p50_range: float) -> list[dict[str, Any]]:
    """Per-seed runs reaching the target at ``steps_to`` with a median that moves by
    ``p50_range`` after step 0."""
    return [{"steps_to_target": s, "final_test_acc": 0.97,
             "probe": {"p50": [5.0, 0.0, p50_range]}} for s in steps_to]


@pytest.mark.parametrize(("bn", "plain", "outcome", "at"), [
    # BN trains at 0.1 .. 1 on every seed, the plain net only at 0.1: compared at lr 1
    ([acc(.97, .97), acc(.97, .96), acc(.95, .96)], [acc(.95, .95), acc(.1, .1), acc(.1, .1)],
     "reproduced", "lr 1 (the largest"),
    # at BN's largest working lr the plain net is as good
    ([acc(.97, .97), acc(.97, .96), acc(.5, .96)], [acc(.95, .95), acc(.97, .97), acc(.1, .1)],
     "not reproduced", "lr 0.3"),
    # one seed better, one worse
    ([acc(.97, .97), acc(.97, .96), acc(.1, .1)], [acc(.95, .95), acc(.90, .98), acc(.1, .1)],
     "inconclusive", "lr 0.3"),
    # BN trains nowhere: its best lr is used, and the plain net wins there
    ([acc(.5, .6), acc(.7, .7), acc(.1, .1)], [acc(.95, .95), acc(.8, .8), acc(.1, .1)],
     "not reproduced", "at no lr"),
])
def test_learning_rate_rule(bn, plain, outcome: str, at: str) -> None:  # noqa: ANN001
    verdict = learning_rate_verdict([0.1, 0.3, 1.0], bn, plain, MARGIN)
    assert verdict.outcome == outcome and at in verdict.evidence


@pytest.mark.parametrize(("bn", "plain", "outcome", "ends"), [
    # BN works at every scale but the last: the ends are 0.1 and 10; the plain net fails both
    ([acc(.97, .97), acc(.97, .97), acc(.95, .96), acc(.3, .4)],
     [acc(.1, .1), acc(.96, .96), acc(.1, .1), acc(.1, .1)], "reproduced", "0.1 and 10"),
    # the plain net keeps up at the large end: the smaller effect decides
    ([acc(.97, .97), acc(.97, .97), acc(.95, .96), acc(.3, .4)],
     [acc(.1, .1), acc(.96, .96), acc(.96, .97), acc(.1, .1)], "not reproduced", "0.1 and 10"),
])
def test_init_rule_takes_the_worse_end(bn, plain, outcome: str, ends: str) -> None:  # noqa: ANN001
    verdict = init_verdict([0.1, 1.0, 10.0, 100.0], bn, plain, MARGIN)
    assert verdict.outcome == outcome and ends in verdict.evidence


@pytest.mark.parametrize(("bn", "gn", "outcome"), [
    (acc(.90, .91, .92), acc(.96, .96, .96), "reproduced"),       # BN's error 4-6 pts higher
    (acc(.96, .96, .96), acc(.90, .91, .92), "not reproduced"),   # BN better: the claim fails
    (acc(.955, .955, .955), acc(.96, .96, .96), "inconclusive"),  # 0.5 points: inside margin
    (acc(.90, .97, .92), acc(.96, .96, .96), "inconclusive"),     # seeds disagree
    (acc(.90), acc(.96), "inconclusive"),                         # one seed
])
def test_batch_size_rule(bn, gn, outcome: str) -> None:  # noqa: ANN001
    assert batch_size_verdict(2, bn, gn, MARGIN).outcome == outcome


@pytest.mark.parametrize(("plain", "bn", "outcome"), [
    (curve([None, None], 1.8), curve([200, 300], 0.5), "reproduced"),
    (curve([None, None], 0.5), curve([200, 300], 0.5), "not reproduced"),  # no stabler
    (curve([250, 300], 1.8), curve([200, 300], 0.5), "inconclusive"),  # 50 and 0 steps < 100
    (curve([200, 300], 1.8), curve([250, 350], 0.5), "not reproduced"),  # BN slower
])
def test_bn_paper_rule(plain, bn, outcome: str) -> None:  # noqa: ANN001
    assert bn_paper_verdict(plain, bn, limit=3000, eval_every=50).outcome == outcome


def placement(none_steps: list[int | None], before: float, after: float, inp: float,
              out: float) -> dict[str, list[dict[str, Any]]]:
    def runs(a: float, steps: list[int | None]) -> list[dict[str, Any]]:
        return [{"final_test_acc": a, "steps_to_target": s} for s in steps]

    fast = [50] * len(none_steps)
    return {"no norm": runs(0.95, none_steps), "BN before act": runs(before, fast),
            "BN after act": runs(after, fast), "BN before act + input BN": runs(inp, fast),
            "BN before act + output BN": runs(out, fast)}


@pytest.mark.parametrize(("results", "outcome"), [
    (placement([900, 800], .98, .96, .96, .95), "reproduced"),
    (placement([900, 800], .98, .975, .96, .95), "inconclusive"),  # 0.5 points < margin
    (placement([900, 800], .98, .98, .96, .95), "not reproduced"),  # before = after
    (placement([900, 800], .98, .96, .96, .98), "not reproduced"),  # output BN costs nothing
    (placement([50, 40], .98, .96, .96, .95), "not reproduced"),   # BN is not faster
    (placement([50, 60], .98, .96, .96, .95), "inconclusive"),     # 0 and 10 steps faster
])
def test_placement_rule(results, outcome: str) -> None:  # noqa: ANN001
    assert placement_verdict(results, limit=1500, eval_every=25, margin=MARGIN).outcome == outcome

"""Verdicts: whether an experiment's claim held on this data, by a rule fixed before the run.

Every experiment states its claim (``normlab.experiments.registry``) and decides it with
one of the rules here, over the per-seed values of an effect (a difference of accuracies,
say, in points): the claim is

- **reproduced** when every seed (at least ``min_seeds`` of them) shows the effect by more
  than the margin,
- **not reproduced** when no seed shows it at all (every seed's effect at most ``0``: the
  claimed direction is absent),
- **inconclusive** otherwise: the seeds disagree, the effect sits inside the margin, or
  there is a single seed (a quick run), which cannot show the seed-to-seed spread.

The margin of an accuracy effect is never below two test examples nor one point
(:func:`accuracy_margin`), so a difference of one or two images never decides a claim.
A claim made of several parts ("faster *and* more stable") is decided by :func:`all_of`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["OUTCOMES", "Verdict", "accuracy_margin", "all_of", "effect_verdict", "resolution",
           "spread"]

OUTCOMES = ("reproduced", "not reproduced", "inconclusive")


@dataclass(frozen=True)
class Verdict:
    """An outcome (one of :data:`OUTCOMES`), the rule that decided it, and the numbers."""

    outcome: str
    rule: str
    evidence: str

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")

    @property
    def text(self) -> str:
        """One sentence for the terminal and the report: ``Verdict: <outcome> (<evidence>).``"""
        return f"Verdict: {self.outcome} ({self.evidence})."

    def to_dict(self) -> dict[str, str]:
        return {"outcome": self.outcome, "rule": self.rule, "evidence": self.evidence}


def resolution(test_size: int) -> float:
    """One test example as a fraction of the test set (the smallest difference that means
    anything for an accuracy)."""
    return 1.0 / max(1, test_size)


_ROUNDING = 1e-9


def accuracy_margin(test_size: int, floor: float = 0.01) -> float:
    """The margin an accuracy effect must beat: two test examples, and at least ``floor``
    (one point), since seeds alone move a small test set's accuracy by about that much."""
    return max(2 * resolution(test_size), floor)


def spread(values: Sequence[float]) -> float:
    """max - min of the per-seed values (0 for one seed)."""
    return max(values) - min(values) if values else 0.0


def _shown(values: Sequence[float], scale: float, digits: int) -> str:
    low, high = min(values) * scale, max(values) * scale
    if len(values) == 1 or low == high:
        return f"{low:+.{digits}f}"
    return f"{low:+.{digits}f} .. {high:+.{digits}f}"


def effect_verdict(
    effects: Sequence[float],
    margin: float,
    *,
    what: str,
    min_seeds: int = 2,
    unit: str = "points",
    scale: float = 100.0,
    digits: int = 1,
) -> Verdict:
    """Decide a claim from the per-seed ``effects`` (positive = the claimed direction, e.g.
    "BN's accuracy minus the plain net's") against ``margin`` (same units as ``effects``).

    ``what`` names the effect in words ("BN's accuracy advantage at lr 1", say). Effects
    and margin are shown multiplied by ``scale`` in ``unit`` (default: fractions shown as
    points; pass ``unit="steps", scale=1, digits=0`` for counts). Inconclusive with fewer
    than ``min_seeds`` seeds, whatever they show; else reproduced if every ``effect >
    margin``, not reproduced if every ``effect <= 0``, inconclusive otherwise."""
    if not effects:
        raise ValueError("effects must hold at least one value (one per seed)")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    seeds = len(effects)
    unit = f" {unit}" if unit else ""
    said = (f"{what}: {_shown(effects, scale, digits)}{unit} over {seeds} "
            f"seed{'s' * (seeds > 1)}, margin {margin * scale:.{digits}f}")
    rule = (f"reproduced if {what} exceeds {margin * scale:.{digits}f}{unit} on every seed "
            f"(at least {min_seeds}); not reproduced if it is <= 0 on every seed; "
            "else inconclusive")
    if seeds < min_seeds:  # one seed cannot tell an effect from seed-to-seed noise
        return Verdict("inconclusive", rule,
                       f"{said}; fewer than {min_seeds} seeds cannot show the spread")
    # "more than the margin": an effect equal to it (up to float rounding, e.g. 0.311 -
    # 0.301 against 0.01) does not pass
    if all(e - margin > _ROUNDING for e in effects):
        return Verdict("reproduced", rule, said)
    if all(e <= 0 for e in effects):
        return Verdict("not reproduced", rule, said)
    return Verdict("inconclusive", rule, f"{said}; the seeds disagree or sit within the margin")


def all_of(parts: Sequence[Verdict]) -> Verdict:
    """A claim made of ``parts`` that must all hold: reproduced if every part is, not
    reproduced if any part is not, inconclusive otherwise."""
    if not parts:
        raise ValueError("parts must hold at least one verdict")
    outcomes = [p.outcome for p in parts]
    if all(o == "reproduced" for o in outcomes):
        outcome = "reproduced"
    elif "not reproduced" in outcomes:
        outcome = "not reproduced"
    else:
        outcome = "inconclusive"
    rule = "every part must hold: " + "; ".join(
        f"({i}) {p.rule}" for i, p in enumerate(parts, 1))
    evidence = "; ".join(f"({i}) {p.outcome}: {p.evidence}" for i, p in enumerate(parts, 1))
    return Verdict(outcome, rule, evidence)

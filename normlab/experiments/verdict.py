"""Verdicts: whether an experiment's claim held on this data, by a rule fixed before the run.

Every experiment states its claim (``normlab.experiments.registry``) and decides it with
one of the rules here, over the per-seed values of an effect (a difference of accuracies,
say, in points): the claim is

- **reproduced** when every seed shows the effect by more than the margin,
- **not reproduced** when no seed shows it by more than the margin the other way round
  cannot either (every seed's effect at most ``0``: the claimed direction is absent),
- **inconclusive** otherwise: the seeds disagree, the effect sits inside the margin, or
  there is a single seed (a quick run), which cannot show the seed-to-seed spread.

The margin is never below the resolution of the test set (one test example), so a
difference of one or two images never decides a claim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["OUTCOMES", "Verdict", "effect_verdict", "spread", "resolution"]

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


def spread(values: Sequence[float]) -> float:
    """max - min of the per-seed values (0 for one seed)."""
    return max(values) - min(values) if values else 0.0


def _points(values: Sequence[float]) -> str:
    shown = [f"{100 * v:+.1f}" for v in values]
    return shown[0] if len(shown) == 1 else f"{min(shown, key=float)} .. {max(shown, key=float)}"


def effect_verdict(
    effects: Sequence[float], margin: float, *, what: str, min_seeds: int = 2
) -> Verdict:
    """Decide a claim from the per-seed ``effects`` (fractions; positive = the claimed
    direction, e.g. "BN's accuracy minus the plain net's") against ``margin`` (a fraction).

    ``what`` names the effect in words ("BN's accuracy advantage at lr 1", say). Reproduced:
    at least ``min_seeds`` seeds, all with ``effect > margin``; not reproduced: every
    ``effect <= 0``; inconclusive otherwise."""
    if not effects:
        raise ValueError("effects must hold at least one value (one per seed)")
    seeds = len(effects)
    said = (f"{what}: {_points(effects)} points over {seeds} seed{'s' * (seeds > 1)}, "
            f"margin {100 * margin:.1f}")
    rule = (f"reproduced if {what} exceeds {100 * margin:.1f} points on each of at least "
            f"{min_seeds} seeds; not reproduced if it is <= 0 on every seed; else inconclusive")
    if all(e <= 0 for e in effects):
        return Verdict("not reproduced", rule, said)
    if seeds >= min_seeds and all(e > margin for e in effects):
        return Verdict("reproduced", rule, said)
    reason = "one seed cannot show the spread" if seeds < min_seeds else "within the margin"
    return Verdict("inconclusive", rule, f"{said}; {reason}")

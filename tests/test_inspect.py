"""normlab.inspect: planted train/eval gap, dead and exploding channels are found; records match
a float64 NumPy computation of the same statistics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from normlab import inspect as ni
from normlab.tools import recalibrate


def _model(bn2: type[nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        bn2(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nlnn.BatchNorm1d(6),
        nn.LayerNorm(6),
    )


def _batches(n: int = 3, batch: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 6, 6, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("bn2", [nn.BatchNorm2d, nlnn.BatchNorm2d])
def test_planted_train_eval_gap_is_localized(bn2):
    model = _model(bn2).eval()
    batches = _batches()
    recalibrate(model, batches, progress=False)  # running stats = exact batch stats: no gap
    clean = ni.train_eval_gap(model, batches)
    assert [g.name for g in clean] == ["1", "4", "9"]
    assert not any(g.flagged for g in clean)
    assert max(g.mean_shift for g in clean) < 1e-3

    with torch.no_grad():  # plant: channel 5 of layer "4" has a stale mean (3 std off)
        model[4].running_mean[5] += 3 * model[4].running_var[5].sqrt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gaps = {g.name: g for g in ni.train_eval_gap(model, batches)}
    assert [n for n, g in gaps.items() if g.flagged] == ["4"]
    assert gaps["4"].worst_channel == 5
    assert gaps["4"].mean_shift == pytest.approx(3.0, rel=1e-3)
    # per-batch vs population statistics give every layer some drift; the planted gap adds
    # to it at "4" and downstream, not upstream
    drift = {g.name: g.output_drift for g in clean}
    assert gaps["1"].output_drift == pytest.approx(drift["1"], rel=1e-9)
    assert gaps["4"].output_drift > 2 * drift["4"]
    assert gaps["9"].output_drift > 1.5 * drift["9"]
    # diagnosing changes nothing
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m.training for m in model.modules())


def test_planted_dead_and_exploding_channels():
    model = _model().eval()
    with torch.no_grad():
        model[3].weight[2].zero_()  # conv output channel 2 is its bias: constant -> dead input
        model[1].weight[4] = 0.0  # gamma 0: the BN output channel 4 is constant
        model[0].weight[6] *= 1e5  # exploding input to BN "1", channel 6
    issues = ni.find_channel_issues(model, _batches())
    found = {(i.layer, i.channel, i.kind) for i in issues}
    assert found == {
        ("4", 2, "dead-input"),
        ("4", 2, "dead-output"),
        ("1", 4, "dead-output"),
        ("1", 4, "zero-gamma"),
        ("1", 6, "exploding"),
    }


def test_non_finite_channel():
    model = _model().eval()
    x = _batches(1)[0]
    x[0, 1, 2, 2] = float("nan")
    issues = ni.find_channel_issues(nn.Sequential(nn.BatchNorm2d(3)).eval(), [x])
    assert [(i.channel, i.kind, i.value) for i in issues] == [(1, "non-finite", 1.0)]
    assert ni.find_channel_issues(model, _batches()) == []  # a healthy model: nothing


def test_batch_size_warnings():
    model = _model()
    with pytest.warns(ni.NormWarning, match=r"GroupNorm.*SyncBatchNorm"):
        msgs = ni.check_batch_size(model, 4, world_size=8)
    assert "global batch 32" in msgs[0] and "3 BatchNorm" in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ni.check_batch_size(model, 32) == []
        assert ni.check_batch_size(nn.Sequential(nn.LayerNorm(4)), 2) == []
    with pytest.raises(ValueError, match="batch_size"):
        ni.check_batch_size(model, 0)


def test_activation_recorder_matches_numpy(tmp_path):
    model = _model().train()
    batches = _batches(4, batch=8)
    seen = {}
    model[4].register_forward_hook(
        lambda m, a, o: seen.update(
            pre=a[0].detach().double().numpy(), post=o.detach().double().numpy()
        )
    )
    with ni.ActivationRecorder(model, every=1) as rec:
        for x in batches:
            model.zero_grad()
            model(x).square().mean().backward()
            with torch.no_grad():  # plain SGD (torch.optim's first use imports dynamo: slow)
                for p in model.parameters():
                    p -= 0.05 * p.grad
        model.eval()
        model(batches[0])  # eval forward: not recorded (training_only)
    assert not model._forward_pre_hooks  # detached
    assert set(rec.records) == {"1", "4", "9", "10"}
    assert [r.step for r in rec.records["4"]] == [0, 1, 2, 3]
    # exact check: the recorder's summary of one training forward vs NumPy float64 on the
    # same tensors (2304 elements < max_samples, so the percentiles are not subsampled)
    model.train()
    rec2 = ni.ActivationRecorder(model, layers=["4"], percentiles=(15, 50, 85))
    with rec2:
        model(batches[0])
    r = rec2.records["4"][0]
    for side, ref in (("pre", seen["pre"]), ("post", seen["post"])):
        s = getattr(r, side)
        np.testing.assert_allclose(s.mean, ref.mean(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(s.std, ref.std(), rtol=1e-6)
        np.testing.assert_allclose(
            list(s.percentiles.values()), np.percentile(ref, [15, 50, 85]), rtol=1e-6
        )
    table = rec.table()
    assert "p85" in table and table.count("\n") == 1 + 2 * 4
    fig = rec.plot(layers=["4"], path=str(tmp_path / "act.png"))
    assert (tmp_path / "act.png").stat().st_size > 0 and len(fig.axes) == 2
    assert len(rec.plot().axes) == 8  # every layer, pre and post
    with pytest.raises(ValueError, match="not norm layers"):
        ni.ActivationRecorder(model, layers=["0"])


def test_diagnose_report():
    model = _model().eval()
    batches = _batches(2, batch=4)
    with torch.no_grad():
        model[3].weight[0].zero_()
    recalibrate(model, batches, progress=False)
    with torch.no_grad():
        model[9].running_var[1] *= 10.0
    with pytest.warns(ni.NormWarning):
        report = ni.diagnose(model, batches)
    assert [g.name for g in report.gaps if g.flagged] == ["9"]
    assert ("4", 0, "dead-input") in {(i.layer, i.channel, i.kind) for i in report.channel_issues}
    text = report.table()
    for word in ("GAP", "dead-input", "GroupNorm", "recalibrate"):
        assert word in text
    assert len(report.plot().axes) == 2

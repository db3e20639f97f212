"""SyncBatchNorm across processes (gloo on 127.0.0.1) against single-process BatchNorm.

Each process group is spawned once (ranks are subprocesses running ``_worker.py``) and runs
many checks; the tests below assert them one by one, so a failure names its case.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from normlab import ops
from normlab.nn.syncbatchnorm import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "_worker.py"
WORLD_SIZES = (2, 3)
# The fast kernels serve the 2-rank group, the composite torch ones the 3-rank group: both
# backends' split-phase pieces are checked, while each process imports only one of them.
BACKENDS = {2: ops.available()[0], 3: "torch"}
GROUP_WALL_LIMIT_S = 150  # a hang becomes a failure, not a stuck CI job


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(backend: str) -> dict[str, str]:
    env = dict(os.environ, NORMLAB_BACKEND=backend)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _launch(world: int, out_dir: Path) -> list[subprocess.Popen]:
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(world), str(port), str(out_dir)],
            env=_env(BACKENDS[world]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(world)
    ]


def _wait(proc: subprocess.Popen, deadline: float) -> str:
    """Wait for one rank until ``deadline``, then kill it. Returns its output."""
    try:
        out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        out = f"[killed at the deadline]\n{out}"
    return out


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], list[dict]]:
    """Runs a 2-rank and a 3-rank group at once (they share the cores while importing
    torch); returns ``{(world, phase): [result of rank 0, rank 1, ...]}``.

    The last rank of each group dies (2 ranks) or hangs (3 ranks) in the failure phase:
    the others are waited for, then it is given a moment and killed.
    """
    dirs = {w: tmp_path_factory.mktemp(f"world{w}") for w in WORLD_SIZES}
    procs = {w: _launch(w, dirs[w]) for w in WORLD_SIZES}
    deadline = time.monotonic() + GROUP_WALL_LIMIT_S
    results: dict[tuple[int, str], list[dict]] = {}
    for world in WORLD_SIZES:
        logs = [_wait(proc, deadline) for proc in procs[world][:-1]]
        logs.append(_wait(procs[world][-1], min(deadline, time.monotonic() + 2)))
        for phase in PHASES:
            ranks = range(world - 1) if phase == "failure" else range(world)
            results[world, phase] = [
                _read(dirs[world] / f"{phase}_rank{rank}.json", logs) for rank in ranks
            ]
    return results


def _read(path: Path, logs: list[str]) -> dict:
    if not path.exists():
        return {"error": f"no {path.name}; output of the ranks:\n" + "\n".join(logs)}
    return json.loads(path.read_text())


def _import_worker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_syncbn_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_WORKER_MODULE = _import_worker()
CASE_NAMES = [case[0] for case in _WORKER_MODULE.CASES]
PHASES = list(_WORKER_MODULE.PHASES)


def _assert_checks(results: list[dict], prefix: str) -> None:
    checked = 0
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
        for key, (err, tol) in result.items():
            if key.startswith(prefix):
                checked += 1
                assert err <= tol, f"rank {rank}: {key}: error {err:.3g} > tolerance {tol:.3g}"
    assert checked > 0, f"no checks named {prefix!r}"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_matches_single_process_batchnorm(groups: dict, world: int, case: str) -> None:
    """Outputs, grads, running stats, num_batches_tracked, one collective per pass, eval."""
    _assert_checks(groups[world, "equivalence"], case + "/")


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("split", ["uneven", "empty"])
def test_masked_matches_single_process_masked_batchnorm(groups: dict, world: int,
                                                        split: str) -> None:
    """Masks with a different valid count on every rank (one rank all padding, one rank
    empty): single-process masked BatchNorm on the concatenated batch, one collective each
    way."""
    _assert_checks(groups[world, "masked"], f"masked/{split}/")


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("part", [*CASE_NAMES, "masked/uneven", "masked/empty"])
def test_counts_kept_on_the_device_give_the_same_results(groups: dict, world: int,
                                                         part: str) -> None:
    """The GPU path (global counts as device tensors, nothing read back to the host), run
    on gloo by treating CPU tensors as unreadable: the same equivalence and masked checks
    hold."""
    _assert_checks(groups[world, "device_counts"], part + "/")


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ddp_training_matches_full_batch(groups: dict, world: int) -> None:
    """3 SGD steps under DDP (uneven batches) == 3 single-process steps on the full batch."""
    _assert_checks(groups[world, "equivalence"], "ddp/")


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("rule", ["error", "running", "skip_update", "frozen", "empty"])
def test_batch_size_rules_use_the_global_batch(groups: dict, world: int, rule: str) -> None:
    """One value per channel over all ranks (small_batch policies), freeze_stats, and an
    empty global batch: every rank takes the same path, as single-process BatchNorm would."""
    _assert_checks(groups[world, "equivalence"], f"rules/{rule}/")


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("split", ["uneven", "empty"])
def test_output_modified_in_place(groups: dict, world: int, split: str) -> None:
    """Conv -> SyncBatchNorm -> ReLU(inplace=True) and ``out += identity`` (a ResNet
    block), and a SyncBatchNormAct output modified in place, train like single-process
    BatchNorm: outputs, input and parameter gradients, running statistics."""
    _assert_checks(groups[world, "inplace"], f"inplace/{split}/")
    assert all(result.get("inplace/converted") == [0, 0] for result in groups[world, "inplace"])


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("call", ["layer", "layer_again", "functional"])
def test_channel_mismatch_raises_on_every_rank(groups: dict, world: int, call: str) -> None:
    """Different channel counts on the ranks: every rank raises a ValueError naming each
    rank's count (no process aborted by gloo: each wrote its results), and the group
    still works afterwards."""
    results = groups[world, "channels"]
    _assert_checks(results, f"channels/{call}/")
    for result in results:
        assert f"channels/{call}/names_counts" in result
    _assert_checks(results, "channels/group_usable_after")


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_every_case_ran_every_check(groups: dict, world: int) -> None:
    """Guard against a silently skipped case or check, or a backend other than intended."""
    for rank_result in groups[world, "equivalence"]:
        assert f"backend/{BACKENDS[world]}" in rank_result
        for case in CASE_NAMES:
            for step in range(2):
                for check in ("collectives_forward", "collectives_backward", "output",
                              "grad_input"):
                    assert f"{case}/step{step}/{check}" in rank_result


@pytest.mark.parametrize(
    "world, mode", [(2, "dead"), (3, "hung")], ids=["dead_peer", "hung_peer"]
)
@pytest.mark.parametrize("collective", ["all_reduce", "all_gather"])
def test_failed_peer_raises_naming_collective(
    groups: dict, world: int, mode: str, collective: str
) -> None:
    """The last rank dies (its sockets close) or hangs (only the 3 s timeout can tell):
    the others get a RuntimeError naming the collective, in bounded time, not a hang."""
    results = groups[world, "failure"]
    _assert_checks(results, f"{mode}/{collective}")
    for result in results:
        assert f"{mode}/{collective}_names_collective" in result


# --- single-process behaviour: no process group -> plain BatchNorm -------------------------

@pytest.mark.parametrize(
    "shape, torch_cls", [((4, 3), nn.BatchNorm1d), ((4, 3, 5), nn.BatchNorm1d),
                         ((2, 3, 4, 5), nn.BatchNorm2d), ((2, 3, 2, 3, 4), nn.BatchNorm3d)]
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_is_plain_batchnorm(shape, torch_cls, momentum) -> None:
    torch.manual_seed(0)
    sync, ref = SyncBatchNorm(3, momentum=momentum), torch_cls(3, momentum=momentum)
    for _ in range(2):
        x = torch.randn(shape)
        torch.testing.assert_close(sync(x), ref(x))
    assert sync.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[key], value)
    sync.eval()
    ref.eval()
    torch.testing.assert_close(sync(x), ref(x))


def test_state_dict_compatible_with_torch_syncbatchnorm() -> None:
    ours = SyncBatchNorm(4, affine=True, bias=False)
    theirs = nn.SyncBatchNorm(4, affine=True, bias=False)
    theirs.running_mean.normal_()
    theirs.num_batches_tracked.fill_(7)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    assert int(ours.num_batches_tracked) == 7


@pytest.mark.parametrize(
    "bad, error", [(torch.randn(4), ValueError), (torch.randn(4, 5), ValueError),
                   (torch.ones(4, 3, dtype=torch.long), TypeError)]
)
def test_bad_input_raises(bad: torch.Tensor, error: type) -> None:
    with pytest.raises(error, match="input"):
        SyncBatchNorm(3)(bad)


def _net() -> nn.Module:
    import normlab.nn as nlnn

    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nlnn.BatchNorm1d(4)),
        nn.BatchNorm3d(4, affine=False), nn.SyncBatchNorm(4, track_running_stats=False),
        nn.InstanceNorm2d(4),
    )


def test_convert_keeps_state_and_revert_round_trips() -> None:
    net = _net()
    net[1].weight.requires_grad_(False)
    net[2].eval()
    originals = {name: t for name, t in {**dict(net.named_parameters()),
                                         **dict(net.named_buffers())}.items()}
    types = [type(m) for m in net.modules()]
    converted = convert_sync_batchnorm(net, process_group=None)
    sync_layers = [converted[1], converted[2][0], converted[3], converted[4]]
    assert all(type(m) is SyncBatchNorm for m in sync_layers)
    assert type(converted[5]) is nn.InstanceNorm2d  # not a BatchNorm: left alone
    after = {**dict(converted.named_parameters()), **dict(converted.named_buffers())}
    assert after.keys() == originals.keys()
    assert all(after[k] is originals[k] for k in originals)  # the same objects
    assert not converted[1].weight.requires_grad and not converted[2][0].training
    assert converted[3].affine is False and converted[4].track_running_stats is False
    reverted = revert_sync_batchnorm(converted)
    # torch.nn/normlab BatchNorm*d come back as themselves; torch's SyncBatchNorm as a
    # plain layer (2d by default, no input seen).
    import normlab.nn as nlnn

    expected = types[:6] + [nlnn.BatchNorm2d] + types[7:]
    assert [type(m) for m in reverted.modules()] == expected
    assert all(dict(reverted.named_buffers())[k] is v for k, v in net.named_buffers())


def test_convert_norm_act_and_variants() -> None:
    import normlab.nn as nlnn
    from normlab.nn.act import BatchNormAct2d
    from normlab.nn.ghost import GhostBatchNorm2d
    from normlab.nn.renorm import BatchRenorm2d
    from normlab.nn.syncbatchnorm import SyncBatchNormAct

    act = BatchNormAct2d(3, act="leaky_relu", slope=0.2)
    ghost, renorm = GhostBatchNorm2d(3, virtual_batch_size=2), BatchRenorm2d(3)
    net = nn.Sequential(act, ghost, renorm)
    with pytest.warns(UserWarning, match="left a BatchRenorm2d unsynchronized"):
        convert_sync_batchnorm(net)
    assert type(net[0]) is SyncBatchNormAct and net[0].weight is act.weight
    assert (net[0].act, net[0].slope) == ("leaky_relu", 0.2)
    assert net[1] is ghost and net[2] is renorm
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(net[0](x), nn.functional.leaky_relu(
        nlnn.BatchNorm2d(3)(x), 0.2))  # no process group: plain BatchNorm, then the activation
    revert_sync_batchnorm(net)
    assert type(net[0]) is BatchNormAct2d and net[0].slope == 0.2


def test_classmethod_converts_like_torch() -> None:
    layer = nn.BatchNorm2d(3)
    converted = SyncBatchNorm.convert_sync_batchnorm(layer)
    assert type(converted) is SyncBatchNorm and converted.weight is layer.weight


@pytest.mark.parametrize("dims, shape", [(None, (4, 3, 5)), (None, (2, 3, 2, 2, 2)), (2, (4, 3))])
def test_revert_picks_dims_from_input_or_argument(dims, shape) -> None:
    import normlab.nn as nlnn

    layer = SyncBatchNorm(3)
    layer(torch.randn(shape))
    plain = revert_sync_batchnorm(layer, dims=dims)
    expected = {2: nlnn.BatchNorm1d, 3: nlnn.BatchNorm1d, 4: nlnn.BatchNorm2d,
                5: nlnn.BatchNorm3d}[len(shape)] if dims is None else nlnn.BatchNorm2d
    assert type(plain) is expected
    torch.testing.assert_close(plain.running_var, layer.running_var)
    with pytest.raises(ValueError, match="dims"):
        revert_sync_batchnorm(layer, dims=4)

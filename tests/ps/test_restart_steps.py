"""What lets a restarted worker rejoin a sync job: a step's parts keyed by rank, completed steps
closed, and barriers where a rank counts once however often it arrives."""
import threading
import time

import numpy as np
import pytest

from shoal.ps.errors import PSError
from shoal.ps.service import PSService, _StepSum


def test_a_rank_pushing_a_step_again_replaces_its_part():
    steps = _StepSum()
    assert steps.add("t", [3, 2, 1], "dead worker's part") is None
    assert steps.add("t", [3, 2, 1], "restarted worker's part") is None   # replaced, not added
    assert sorted(steps.add("t", [3, 2, 0], "worker 0")) == ["restarted worker's part", "worker 0"]
    assert steps.done["t"] == 3


def test_a_replayed_part_for_a_completed_step_is_dropped_and_a_later_phase_counts_again():
    steps = _StepSum()
    steps.add("t", [0, 2, 0], "a")
    assert steps.add("t", [0, 2, 1], "b") is not None
    assert steps.add("t", [0, 2, 1, 1], "a restarted worker's replay") is None  # applied before
    assert not steps.open
    # a later phase on the same servers starts its steps at 0 again: those parts count
    assert steps.add("t", [0, 2, 0, 0], "phase 2, worker 0") is None
    assert steps.add("t", [0, 2, 1], "phase 2, worker 1") is not None


@pytest.mark.parametrize("sync", [[1], [1, 0], [1, 2, 2], [1, 2, -1], [1, True], "x", [1, 2, 0, 2],
                                  [1, 2, 0, 0, 0]])
def test_bad_sync_headers_are_refused(sync):
    with pytest.raises(PSError, match="sync"):
        _StepSum().add("t", sync, "part")


def _barrier(service, results, **header):
    try:
        service.op_barrier(dict({"name": "b", "count": 2, "timeout": 5.0}, **header), [])
        results.append("ok")
    except PSError as e:
        results.append(str(e))


def test_a_rank_arriving_twice_counts_once_and_the_gathering_is_visible():
    service = PSService(0, 1)
    results = []
    threads = [threading.Thread(target=_barrier, args=(service, results), kwargs={"member": 1})
               for _ in range(2)]  # the dead rank 1's call, still waiting, and its successor's
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert results == []  # two arrivals of rank 1 are one
    (header, _) = service.op_gatherings({"prefix": "b"}, [])
    assert header["open"]["b"] == {"count": 2, "arrived": 1, "members": [1]}
    _barrier(service, results, member=0)
    for t in threads:
        t.join(5)
    assert results == ["ok", "ok", "ok"]
    assert service.op_gatherings({"prefix": ""}, [])[0]["open"] == {}


def test_a_bad_member_is_refused_and_changes_nothing():
    service = PSService(0, 1)
    for member in (2, -1, "0", True):
        with pytest.raises(PSError, match="member"):
            service.op_barrier({"name": "b", "count": 2, "timeout": 1.0, "member": member}, [])
    assert service.op_gatherings({"prefix": ""}, [])[0]["open"] == {}


def test_a_reduce_of_the_wrong_shape_leaves_the_gathering_as_it_was():
    service = PSService(0, 1)
    done = []
    t = threading.Thread(target=lambda: done.append(service.op_reduce(
        {"name": "r", "count": 2, "timeout": 5.0, "member": 0}, [np.ones(3)])))
    t.start()
    time.sleep(0.1)
    with pytest.raises(PSError, match="does not match"):
        service.op_reduce({"name": "r", "count": 2, "timeout": 5.0, "member": 1}, [np.ones(4)])
    assert service.op_gatherings({"prefix": "r"}, [])[0]["open"]["r"]["members"] == [0]
    service.op_reduce({"name": "r", "count": 2, "timeout": 5.0, "member": 1}, [np.ones(3)])
    t.join(5)
    assert done[0][1][0].tolist() == [2.0, 2.0, 2.0]

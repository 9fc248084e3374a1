"""Pipeline schedules without processes: exact streams, matching, in-flight bounds, validation."""
import pytest

from shoal.collective import InvalidArgumentError
from shoal.collective.pipeline import (Backward, Forward, OptimizerStep, PipelineLayer,
                                       RecvActivation, RecvGrad, ReduceGrads, ScheduleError,
                                       ScheduleMode, SendActivation, SendGrad, check_streams,
                                       forward_only, fthenb, in_flight, one_f_one_b, streams)

F, B, RA, SA, RG, SG = Forward, Backward, RecvActivation, SendActivation, RecvGrad, SendGrad
END = [ReduceGrads(), OptimizerStep()]


def test_one_f_one_b_two_stages_four_micro_batches_exactly():
    assert list(one_f_one_b(0, 2, 4)) == [
        F(0), SA(0),                                     # warm-up: one forward
        F(1), SA(1), RG(0), B(0),
        F(2), SA(2), RG(1), B(1),
        F(3), SA(3), RG(2), B(2),
        RG(3), B(3),                                     # cool-down
    ] + END
    assert list(one_f_one_b(1, 2, 4)) == [
        RA(0),
        F(0), B(0), RA(1), SG(0),
        F(1), B(1), RA(2), SG(1),
        F(2), B(2), RA(3), SG(2),
        F(3), B(3), SG(3),
    ] + END


def test_fthenb_two_stages_four_micro_batches_exactly():
    assert list(fthenb(0, 2, 4)) == [
        F(0), SA(0), F(1), SA(1), F(2), SA(2), F(3), SA(3),
        RG(0), B(0), RG(1), B(1), RG(2), B(2), RG(3), B(3),
    ] + END
    assert list(fthenb(1, 2, 4)) == [
        RA(0), F(0), RA(1), F(1), RA(2), F(2), RA(3), F(3),
        B(0), SG(0), B(1), SG(1), B(2), SG(2), B(3), SG(3),
    ] + END


def test_a_single_stage_talks_to_nobody():
    assert list(one_f_one_b(0, 1, 2)) == [F(0), B(0), F(1), B(1)] + END
    assert list(fthenb(0, 1, 2)) == [F(0), F(1), B(0), B(1)] + END


@pytest.mark.parametrize("schedule", [one_f_one_b, fthenb, forward_only])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("m", range(1, 9))
def test_streams_are_matched_and_deadlock_free(schedule, p, m):
    all_streams = streams(schedule, p, m)
    check_streams(all_streams)
    for s, stream in enumerate(all_streams):
        assert sorted(i.micro_batch for i in stream if isinstance(i, F)) == list(range(m))
        if schedule is not forward_only:
            assert sorted(i.micro_batch for i in stream if isinstance(i, B)) == list(range(m))
            assert stream[-2:] == END
        assert not (s == 0 and any(isinstance(i, (RA, SG)) for i in stream))
        assert not (s == p - 1 and any(isinstance(i, (SA, RG)) for i in stream))


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("m", range(1, 9))
def test_one_f_one_b_bounds_activations_in_flight_and_fthenb_does_not(p, m):
    for s in range(p):
        assert in_flight(list(one_f_one_b(s, p, m))) <= p - s
        assert in_flight(list(one_f_one_b(s, p, m))) == min(p - s, m)
        assert in_flight(list(fthenb(s, p, m))) == m


def test_the_checker_finds_a_deadlock():
    # both stages send first in the steady state (the gradient before the next activation's
    # recv): with blocking sends stage 0 waits in SendActivation(1), stage 1 in SendGrad(0)
    s1 = [RA(0), F(0), B(0), SG(0), RA(1), F(1), B(1), SG(1)]
    s0 = [F(0), SA(0), F(1), SA(1), RG(0), B(0), RG(1), B(1)]
    with pytest.raises(ScheduleError, match="deadlock.*stage 0 waits.*SendActivation"):
        check_streams([s0, s1])


def test_the_checker_finds_a_mismatched_order_and_a_missing_stage():
    s0 = [F(0), SA(0), F(1), SA(1), RG(1), B(1), RG(0), B(0)]
    s1 = [RA(0), F(0), RA(1), F(1), B(0), SG(0), B(1), SG(1)]
    with pytest.raises(ScheduleError, match="same order"):
        check_streams([s0, s1])
    with pytest.raises(ScheduleError, match="does not exist"):
        check_streams([list(one_f_one_b(0, 2, 2))])
    with pytest.raises(ScheduleError, match="deadlock"):   # a send nobody receives
        check_streams([[F(0), SA(0), F(1), SA(1)], [RA(0), F(0)]])


def test_the_checker_finds_broken_dependencies():
    with pytest.raises(ScheduleError, match=r"Backward\(micro_batch=0\) comes before Forward"):
        check_streams([[B(0), F(0)]])
    with pytest.raises(ScheduleError, match="appears twice"):
        check_streams([[F(0), F(0)]])
    with pytest.raises(ScheduleError, match=r"comes before RecvActivation\(0\)"):
        check_streams([[F(0), SA(0)], [F(0), RA(0)]])


@pytest.mark.parametrize("args, match", [
    ((2, 2, 4), r"stage must be in 0\.\.1"),
    ((-1, 2, 4), r"stage must be in 0\.\.1"),
    ((0, 0, 4), "at least 1 stage"),
    ((0, 2, 0), "at least 1 micro-batch"),
    ((0, 2, 2.0), "give an int"),
    ((True, 2, 2), "give an int"),
])
@pytest.mark.parametrize("schedule", [one_f_one_b, fthenb])
def test_bad_arguments_raise_with_the_fix(schedule, args, match):
    with pytest.raises(InvalidArgumentError, match=match):
        list(schedule(*args))


def test_schedule_mode_names():
    assert ScheduleMode.parse("1F1B") is ScheduleMode.ONE_F_ONE_B
    assert ScheduleMode.parse("fthenb") is ScheduleMode.F_THEN_B
    with pytest.raises(InvalidArgumentError, match=r"'GPipe'.*\['1F1B', 'FThenB'\]"):
        ScheduleMode.parse("GPipe")


# -- partition (no processes: the stage is given) ------------------------------------------

def _layers(n):
    import shoal
    import shoal.nn as nn
    shoal.seed(0)
    return [nn.Linear(3, 3) for _ in range(n)]


def test_uniform_partition_is_as_even_as_possible_and_keeps_only_its_stage():
    layers = _layers(7)
    pipes = [PipelineLayer(layers, num_stages=3, stage=s) for s in range(3)]
    assert pipes[0].bounds == [0, 2, 4, 7]
    assert [len(p.parameters()) for p in pipes] == [4, 4, 6]
    assert list(pipes[1].state_dict()) == ["2.weight", "2.bias", "3.weight", "3.bias"]
    assert pipes[1].parameters()[0] is layers[2].weight
    assert PipelineLayer(layers, 7, stage=6).segment() == (6, 7)


def test_explicit_cuts_and_a_sequential_keep_the_full_model_names():
    import shoal.nn as nn
    seq = nn.Sequential(*_layers(4))
    last = PipelineLayer(seq, num_stages=2, seg_method=[1], stage=1)
    assert last.bounds == [0, 1, 4] and last.is_last_stage
    assert list(last.state_dict()) == [k for k in seq.state_dict() if not k.startswith("0.")]


@pytest.mark.parametrize("cuts, match", [
    ([2, 2], r"\[2, 2\].*strictly increasing; 2 then 2"),
    ([3, 1], r"strictly increasing; 3 then 1"),
    ([0, 2], r"cut\(s\) \[0\] out of range.*1\.\.3"),
    ([2, 4], r"cut\(s\) \[4\] out of range"),
    ([2], r"3 stages need 2 cut indices.*got 1"),
    ([1, 2, 3], r"3 stages need 2 cut indices.*got 3"),
    ([1.5, 2], r"cut 1\.5 is not an int"),
])
def test_bad_cut_points_raise_naming_them(cuts, match):
    with pytest.raises(InvalidArgumentError, match=match):
        PipelineLayer(_layers(4), num_stages=3, seg_method=cuts, stage=0)


def test_bad_partition_arguments():
    with pytest.raises(InvalidArgumentError, match="cannot fill 3 stages"):
        PipelineLayer(_layers(2), num_stages=3, stage=0)
    with pytest.raises(InvalidArgumentError, match="'even'.*'uniform'"):
        PipelineLayer(_layers(2), num_stages=2, seg_method="even", stage=0)
    with pytest.raises(InvalidArgumentError, match=r"stage=2\): give a stage in 0\.\.1"):
        PipelineLayer(_layers(2), num_stages=2, stage=2)
    with pytest.raises(InvalidArgumentError, match=r"item\(s\) \[1\] are not Layers"):
        PipelineLayer([_layers(1)[0], print], num_stages=1, stage=0)

"""Pipeline parallelism (Paddle's PipelineLayer / PipelineParallel.train_batch): schedules as
pure generators of instructions (schedule.py), the partition of a model into stages
(layer.py) and the executor over send/recv of the pipeline group (parallel.py).

    pipe = PipelineLayer(layers, num_stages=2, seg_method=[2], loss_fn=F.mse_loss)
    model = PipelineParallel.from_world(pipe, dp_degree=1, micro_batch_size=4,
                                        accumulate_steps=4, schedule_mode="1F1B")
    loss = model.train_batch((x, y), optimizer)
"""
from shoal.collective.pipeline.layer import PipelineLayer
from shoal.collective.pipeline.parallel import PipelineParallel
from shoal.collective.pipeline.schedule import (SCHEDULES, Backward, Forward, Instruction,
                                                OptimizerStep, RecvActivation, RecvGrad,
                                                ReduceGrads, ScheduleError, ScheduleMode,
                                                SendActivation, SendGrad, check_streams,
                                                fthenb, forward_only, in_flight, one_f_one_b,
                                                streams)

__all__ = [
    "PipelineLayer", "PipelineParallel", "ScheduleMode", "SCHEDULES", "fthenb", "one_f_one_b",
    "forward_only", "check_streams", "streams", "in_flight", "ScheduleError", "Instruction",
    "RecvActivation", "Forward", "SendActivation", "RecvGrad", "Backward", "SendGrad",
    "ReduceGrads", "OptimizerStep",
]

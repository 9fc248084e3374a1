"""Automatic mixed precision for the eager engine (public as `shoal.amp`, Paddle's paddle.amp).

    model, opt = shoal.amp.decorate(model, opt, level="O2")     # float16 weights, fp32 masters
    scaler = shoal.amp.GradScaler(init_loss_scaling=1024)
    with shoal.amp.auto_cast(level="O2"):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt); scaler.update(); opt.clear_grad()

`auto_cast` picks float16 or float32 per op (_autocast.py), `GradScaler` scales the loss and
skips steps with non-finite gradients (_scaler.py), `decorate` casts models and gives
optimizers master weights (_decorate.py). float16 only: numpy and cupy have no bfloat16.
"""
from shoal.worker.amp._autocast import (KNOWN_OPS, AmpLevel, amp_level, auto_cast, black_list,
                                        white_list)
from shoal.worker.amp._decorate import decorate
from shoal.worker.amp._scaler import GradScaler
from shoal.worker.errors import AmpError

__all__ = ["auto_cast", "GradScaler", "decorate", "AmpError", "AmpLevel", "amp_level",
           "white_list", "black_list", "KNOWN_OPS"]

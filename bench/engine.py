"""One MLP training step through the engine against the same step hand-written in numpy.

MLP 256 -> 400 -> 400 -> 400 -> 2 (ReLU), batch 512, float32, softmax cross
entropy, Adam. Both sides start from the same weights and data; steps are
interleaved (engine, numpy, engine, ...) and the medians compared, because
these machines are noisy. Prints one JSON line per case on stdout:

    {"bench": "engine", "case": ..., "value": <engine ms/step>, "unit": "ms/step",
     "reference": "numpy_handwritten", "ratio": <engine time / numpy time>}

Usage: python bench/engine.py [--steps 200] [--warmup 20] [--batch 512]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import shoal
import shoal.nn as nn
import shoal.nn.functional as F

SIZES = (256, 400, 400, 400, 2)
LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8


class NumpyMLP:
    """The hand-written reference: forward, backward and Adam in plain numpy."""

    def __init__(self, weights: list[np.ndarray]):
        self.params = [w.copy() for w in weights]
        self.m = [np.zeros_like(w) for w in weights]
        self.v = [np.zeros_like(w) for w in weights]
        self.t = 0

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        p = self.params
        n_layers = len(p) // 2
        acts, pre = [x], []
        h = x
        for i in range(n_layers):
            z = h @ p[2 * i] + p[2 * i + 1]
            pre.append(z)
            h = np.maximum(z, 0) if i < n_layers - 1 else z
            acts.append(h)
        logits = h
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        prob = e / e.sum(axis=1, keepdims=True)
        rows = np.arange(len(y))
        loss = float(-np.log(prob[rows, y]).mean())
        d = prob
        d[rows, y] -= 1
        d /= len(y)
        grads = [None] * len(p)
        for i in reversed(range(n_layers)):
            grads[2 * i] = acts[i].T @ d
            grads[2 * i + 1] = d.sum(axis=0)
            if i > 0:
                d = (d @ p[2 * i].T) * (pre[i - 1] > 0)
        self.t += 1
        bc1, bc2 = 1 - B1 ** self.t, 1 - B2 ** self.t
        for w, g, m, v in zip(p, grads, self.m, self.v):
            m *= B1
            m += (1 - B1) * g
            v *= B2
            v += (1 - B2) * g * g
            w -= (LR / bc1) * m / (np.sqrt(v / bc2) + EPS)
        return loss


def build_engine_mlp():
    layers = []
    for i in range(len(SIZES) - 1):
        layers.append(nn.Linear(SIZES[i], SIZES[i + 1]))
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    opt = shoal.optimizer.Adam(LR, beta1=B1, beta2=B2, epsilon=EPS, parameters=model.parameters())
    return model, opt


def engine_step(model, opt, x, y) -> float:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.clear_grad()
    return loss.item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args(argv)

    shoal.seed(0)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((args.batch, SIZES[0])).astype(np.float32)
    y_np = rng.integers(0, SIZES[-1], size=args.batch)
    model, opt = build_engine_mlp()
    ref = NumpyMLP([p.numpy() for p in model.parameters()])
    x, y = shoal.to_tensor(x_np), shoal.to_tensor(y_np)

    # Same start, same math: the first losses must agree (a guard against
    # benchmarking two different computations).
    l_engine, l_ref = engine_step(model, opt, x, y), ref.step(x_np, y_np)
    if not np.isclose(l_engine, l_ref, rtol=1e-4):
        print(f"engine loss {l_engine} != numpy loss {l_ref}", file=sys.stderr)
        return 1

    def timed(fn, *a) -> float:
        t0 = time.perf_counter()
        fn(*a)
        return time.perf_counter() - t0

    t_engine, t_ref = [], []
    for i in range(args.warmup + args.steps):
        # alternate which side runs first so neither always inherits the other's cache state
        if i % 2:
            te, tr = timed(engine_step, model, opt, x, y), timed(ref.step, x_np, y_np)
        else:
            tr, te = timed(ref.step, x_np, y_np), timed(engine_step, model, opt, x, y)
        if i >= args.warmup:
            t_engine.append(te)
            t_ref.append(tr)
    me, mr = statistics.median(t_engine), statistics.median(t_ref)
    case = f"mlp_{'x'.join(map(str, SIZES))}_b{args.batch}_adam_f32"
    print(json.dumps({"bench": "engine", "case": case, "value": round(me * 1e3, 3),
                      "unit": "ms/step", "reference": "numpy_handwritten",
                      "reference_value": round(mr * 1e3, 3), "ratio": round(me / mr, 3)}))
    print(f"engine {me * 1e3:.2f} ms/step, numpy {mr * 1e3:.2f} ms/step, "
          f"ratio {me / mr:.3f} (target <= 1.10)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train an MLP classifier with Shoal's eager engine, save it, reload it, check it.

A synthetic task (two interleaved spirals) that a linear model cannot solve.
Runs in a few seconds on a laptop CPU:

    python examples/mlp.py [--epochs 30] [--hidden 64] [--out /tmp/shoal-mlp.npz]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

import shoal
import shoal.nn as nn
import shoal.nn.functional as F


def spirals(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n points on two spirals with noise: x [n, 2] float32, y [n] int64."""
    t = np.sqrt(rng.uniform(0.05, 1.0, n)) * 4 * np.pi
    y = rng.integers(0, 2, n)
    sign = np.where(y == 1, 1.0, -1.0)
    x = np.stack([sign * t * np.cos(t), sign * t * np.sin(t)], axis=1) / (4 * np.pi)
    x += rng.normal(0, 0.03, x.shape)
    return x.astype(np.float32), y.astype(np.int64)


class MLP(nn.Layer):
    def __init__(self, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                  nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.body(x)


def accuracy(model: nn.Layer, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with shoal.no_grad():
        pred = model(shoal.to_tensor(x)).numpy().argmax(axis=1)
    model.train()
    return float((pred == y).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train an MLP on two spirals with Shoal's engine.")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "shoal-mlp.npz"))
    args = ap.parse_args(argv)

    shoal.seed(0)
    rng = np.random.default_rng(0)
    x_train, y_train = spirals(4096, rng)
    x_test, y_test = spirals(1024, rng)

    model = MLP(args.hidden)
    sched = shoal.optimizer.lr.CosineAnnealingDecay(args.lr, T_max=args.epochs)
    opt = shoal.optimizer.Adam(sched, parameters=model.parameters(),
                               grad_clip=nn.ClipGradByGlobalNorm(5.0))
    print(model)
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        losses = []
        for start in range(0, len(order), args.batch):
            idx = order[start:start + args.batch]
            loss = F.cross_entropy(model(shoal.to_tensor(x_train[idx])), shoal.to_tensor(y_train[idx]))
            loss.backward()
            opt.step()
            opt.clear_grad()
            losses.append(loss.item())
        sched.step()
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {np.mean(losses):.4f}  "
                  f"test accuracy {accuracy(model, x_test, y_test):.3f}  lr {opt.get_lr():.5f}")

    acc = accuracy(model, x_test, y_test)
    shoal.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": args.epochs}, args.out)
    restored = MLP(args.hidden)
    restored.set_state_dict(shoal.load(args.out)["model"])
    same = accuracy(restored, x_test, y_test) == acc
    print(f"saved to {args.out}; reloaded model accuracy matches: {same}")
    if acc < 0.9 or not same:
        print(f"FAILED: test accuracy {acc:.3f} (want >= 0.9), reload matches: {same}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

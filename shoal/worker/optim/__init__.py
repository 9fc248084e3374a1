"""Optimizers and learning-rate schedulers of the eager engine (public as `shoal.optimizer`)."""
from shoal.worker.optim import lr
from shoal.worker.optim.optimizer import ClipGradByGlobalNorm, Optimizer
from shoal.worker.optim.optimizers import SGD, Adagrad, Adam, AdamW, Lamb, Lars, Momentum

__all__ = ["Optimizer", "SGD", "Momentum", "Adam", "AdamW", "Adagrad", "Lamb", "Lars",
           "ClipGradByGlobalNorm", "lr"]

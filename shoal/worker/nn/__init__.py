"""Layers, initializers, losses and functional ops of the eager engine (public as `shoal.nn`)."""
from shoal.worker.nn import initializer
from shoal.worker.nn.layer import Layer, ParamAttr, Parameter
from shoal.worker.nn import functional
from shoal.worker.nn.layers import (GELU, Dropout, Embedding, LayerList, LayerNorm, Linear, ReLU,
                                    Sequential, Sigmoid, Tanh)
from shoal.worker.nn.sparse import EmbeddingBag, SparseEmbedding
from shoal.worker.optim.optimizer import ClipGradByGlobalNorm

__all__ = ["Layer", "Parameter", "ParamAttr", "Linear", "Embedding", "Dropout", "LayerNorm",
           "ReLU", "Sigmoid", "Tanh", "GELU", "Sequential", "LayerList", "ClipGradByGlobalNorm",
           "SparseEmbedding", "EmbeddingBag",
           "functional", "initializer"]

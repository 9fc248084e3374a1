"""The `*_configs` groups of the collective strategies (Paddle 2.0's names and defaults); each is
switched on by the bool of the same name on DistributedStrategy."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from shoal.configs._base import ConfigModel


class AmpConfig(ConfigModel):
    """Automatic mixed precision with dynamic loss scaling."""

    init_loss_scaling: float = Field(32768.0, gt=0, description="the loss scale to start with")
    incr_every_n_steps: int = Field(1000, ge=1, description="grow the scale after this many finite steps")
    decr_every_n_nan_or_inf: int = Field(2, ge=1, description="shrink it after this many non-finite steps")
    incr_ratio: float = Field(2.0, gt=1, description="factor the scale grows by")
    decr_ratio: float = Field(0.8, gt=0, lt=1, description="factor the scale shrinks by")
    use_dynamic_loss_scaling: bool = Field(True, description="false: keep init_loss_scaling fixed")
    custom_white_list: list[str] = Field(default_factory=list, description="ops always run in fp16")
    custom_black_list: list[str] = Field(default_factory=list, description="ops always run in fp32")
    use_pure_fp16: bool = Field(False, description="keep parameters in fp16 too (with fp32 master weights)")

    @model_validator(mode="after")
    def _lists_disjoint(self):
        both = sorted(set(self.custom_white_list) & set(self.custom_black_list))
        if both:
            raise ValueError(f"custom_white_list and custom_black_list both name {both}: an op runs "
                             f"in fp16 or in fp32, not both; remove it from one list")
        return self


class RecomputeConfig(ConfigModel):
    """Activation recomputation: the named layers keep only their inputs and run forward again
    in backward instead of storing their inner activations."""

    checkpoints: list[str] = Field(default_factory=list, description="names of the layers to "
                                   "recompute (as model.named_sublayers() gives them); their "
                                   "inputs are kept")


class GradientMergeConfig(ConfigModel):
    """Accumulate gradients over k steps, then apply them once."""

    k_steps: int = Field(1, ge=1, description="steps merged into one update")
    avg: bool = Field(True, description="average the merged gradients (false: sum them)")


class ShardingConfig(ConfigModel):
    """ZeRO-style sharding of optimizer state (stage 1) and gradients (stage 2)."""

    sharding_degree: int = Field(8, ge=1, description="ranks one copy of the state is sharded over")
    stage: Literal[1, 2] = Field(1, description="1: optimizer state; 2: also gradients")
    hybrid_dp: bool = Field(False, description="data parallel across sharding groups")


class PipelineConfig(ConfigModel):
    """Pipeline parallelism over micro-batches."""

    micro_batch_size: int = Field(1, ge=1, description="samples per micro-batch")
    accumulate_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    schedule_mode: Literal["1F1B", "FThenB"] = Field("1F1B", description="1F1B: interleave forward "
                                                     "and backward; FThenB: all forwards first")


class LarsConfig(ConfigModel):
    """LARS: layer-wise adaptive learning rates for Momentum."""

    lars_coeff: float = Field(0.001, ge=0, description="trust coefficient")
    lars_weight_decay: float = Field(0.0005, ge=0, description="weight decay inside the trust ratio")
    epsilon: float = Field(0.0, ge=0, description="added to the trust ratio's denominator")
    exclude_from_weight_decay: list[str] = Field(default_factory=list,
                                                 description="parameter name fragments without decay")


class LambConfig(ConfigModel):
    """LAMB: layer-wise adaptive moments for Adam."""

    lamb_weight_decay: float = Field(0.01, ge=0, description="decoupled weight decay")
    exclude_from_weight_decay: list[str] = Field(default_factory=list,
                                                 description="parameter name fragments without decay")


class LocalSGDConfig(ConfigModel):
    """Local SGD: train locally, average parameters every k steps."""

    k_steps: int = Field(1, ge=1, description="local steps between averages")
    begin_step: int = Field(1, ge=1, description="step from which local SGD starts")

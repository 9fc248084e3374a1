"""The one place that decides how the collective strategies compose (STYLE.md §9).

Each enabled strategy is one piece applied in a fixed, listed order: the model pieces when
`fleet.distributed_model` wraps the model, the optimizer pieces when
`fleet.distributed_optimizer` wraps the optimizer. Combinations that make no sense are refused
here, by DistributedStrategy's validator, with a message naming both fields — not discovered
at run time by an emergent search over meta-optimizers.

Model, innermost first:
    recompute   the named layers run forward again in backward (their inputs kept)
    amp         O2 casts the parameters to float16; O1/O2 run the forward under auto_cast
    pipeline    the PipelineLayer becomes this rank's stage of a PipelineParallel
    sharding    ShardedDataParallel reduces (stage 1) or reduce-scatters (stage 2) gradients
    (else)      DataParallel all-reduces them (LocalSGD: only before its begin_step)

Optimizer, in the order its pieces see a step:
    lars, lamb      the user's Momentum / Adam is replaced by Lars / Lamb with the configs
    gradient_merge  k backward passes are summed (averaged) before one update
    amp             gradients unscaled; a step with inf/nan is skipped; the scale adapts
    sharding        each rank updates the parameters it owns, then they are gathered
    localsgd        after the update, parameters are averaged every k steps
"""
from __future__ import annotations

MODEL_ORDER = ("recompute", "amp", "pipeline", "sharding")
OPTIMIZER_ORDER = ("lars", "lamb", "gradient_merge", "amp", "sharding", "localsgd")

# (first, second) -> why the two cannot both be on, and what to do instead
INCOMPATIBLE: dict[tuple[str, str], str] = {
    ("lars", "lamb"): "both replace the optimizer's update (LARS for Momentum, LAMB for Adam); "
                      "switch one off",
    ("pipeline", "sharding"): "sharding of a pipeline stage's optimizer state is not built; use "
                              "pipeline with data parallel, or sharding without pipeline",
    ("pipeline", "gradient_merge"): "a pipeline step already accumulates "
                                    "pipeline_configs.accumulate_steps micro-batches; raise "
                                    "accumulate_steps instead of merging steps",
    ("pipeline", "localsgd"): "LocalSGD averages whole models; a pipeline rank holds one stage: "
                              "use pipeline with data parallel",
    ("sharding", "localsgd"): "LocalSGD averages parameters every k steps while sharding splits "
                              "every step's update over the ranks; switch one off",
    ("gradient_merge", "localsgd"): "LocalSGD already skips the per-step gradient all-reduce; "
                                    "merge steps by raising localsgd_configs.k_steps",
}


def conflicts(enabled: set[str]) -> list[tuple[str, str]]:
    """(message, field it is about) for each pair of enabled strategies that do not compose."""
    out = []
    for (a, b), why in INCOMPATIBLE.items():
        if a in enabled and b in enabled:
            out.append((f"{a}=true contradicts {b}=true: {why}", b))
    return out

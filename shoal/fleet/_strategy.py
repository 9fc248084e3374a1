"""The strategy a fleet runtime uses: explicit > SHOAL_STRATEGY's file > the defaults."""
from __future__ import annotations

import os

from shoal.configs import DistributedStrategy
from shoal.fleet.errors import FleetError


class StrategyChoice:
    """What PS and collective runtimes share: which strategy is in force, and who said so."""

    def _take_strategy(self, strategy: DistributedStrategy | None, env) -> None:
        self.explicit_strategy = strategy
        path = getattr(env, "strategy_path", None) if env is not None else \
            os.environ.get("SHOAL_STRATEGY")
        self.strategy = strategy or (DistributedStrategy.load(path) if path else DistributedStrategy())

    def set_strategy(self, strategy: DistributedStrategy | None, where: str) -> None:
        """An explicit strategy wins over the file; two explicit ones that differ raise."""
        if strategy is None:
            return
        if not isinstance(strategy, DistributedStrategy):
            raise FleetError(f"{where}: strategy must be a DistributedStrategy, got "
                             f"{type(strategy).__name__}")
        if self.explicit_strategy is not None and strategy != self.explicit_strategy:
            raise FleetError(f"{where}: this strategy differs from the one given to fleet.init in "
                             f"{self.explicit_strategy.diff(strategy)}; pass one strategy (or the "
                             f"same one) to both")
        self.explicit_strategy = self.strategy = strategy

"""Federation strategies: how the server turns the global head and device deltas into the next head.

A strategy never does I/O. As in Flower (configure_fit + aggregate_fit), the round engine asks it
which devices train and with which settings (`configure_round`), hands it the accepted deltas of
a round (`aggregate`), and persists its optimizer state (`state_dict`) so that a restarted
aggregator resumes FedAdam or FedYogi exactly. `params` gives what to record so that
`make_strategy(strategy.name, **strategy.params())` rebuilds it.

A user's strategy is any `Strategy` subclass, passed to the aggregator as an instance or a
factory (see `build_strategies`). A stateful strategy (FedAdam, FedYogi) keeps moments for one
head, so every task gets its own instance.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefl.core.aggregate import (
    aggregate_median,
    aggregate_trimmed_mean,
    aggregate_weighted,
    check_updates,
    krum,
)
from edgefl.core.settings import RoundPolicy, RoundSettings
from edgefl.head import Weights
from edgefl.transport.messages import DeviceStatus


@dataclass(frozen=True)
class RoundPlan:
    """What a strategy decided for a round: who trains, and the settings the task carries."""

    selected: tuple[str, ...]
    settings: RoundSettings


def select_fraction(
    devices: Iterable[str], round_number: int, fraction: float, min_devices: int, seed: int
) -> tuple[str, ...]:
    """Pick a seeded random share of devices: the default selection.

    Args:
        devices: the candidate device IDs (order does not matter).
        round_number: the round; with `seed` it seeds the draw, so a rerun picks the same.
        fraction: share of the candidates to pick, in (0, 1].
        min_devices: pick at least this many (all of them when there are fewer).
        seed: the federation's seed (`TrainConfig.seed`).

    Returns:
        The picked IDs, sorted.
    """
    ids = sorted(devices)
    count = max(min_devices, math.ceil(fraction * len(ids)))
    if count >= len(ids):
        return tuple(ids)
    rng = np.random.default_rng([seed, round_number])
    return tuple(sorted(str(d) for d in rng.choice(ids, size=count, replace=False)))


def _apply(global_weights: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]) -> Weights:
    """Return global + step, keeping the global weights' dtypes.

    Raises:
        ValueError: the step's keys or shapes differ from the global weights'.
    """
    check_updates([(dict(global_weights), 1), (dict(step), 1)])
    return {
        key: (np.asarray(value) + np.asarray(step[key])).astype(np.asarray(value).dtype)
        for key, value in global_weights.items()
    }


class Strategy(ABC):
    """The server side of one federation algorithm."""

    name: str = ""
    # True when `aggregate` sees the deltas only through their sample-weighted mean (FedAvg,
    # FedProx, FedAdam, FedYogi): ingest workers then send partial weighted sums, not deltas
    # (`edgefl.core.partial_aggregate`). A subclass whose `aggregate` needs each delta (a median,
    # a selection) must leave it False.
    weighted_sum: bool = False

    def configure_round(
        self,
        round_number: int,
        devices: Mapping[str, DeviceStatus],
        settings: RoundSettings,
        policy: RoundPolicy,
        seed: int,
    ) -> RoundPlan:
        """Decide which devices train in a round and the settings their task carries.

        The default picks a seeded `policy.fraction` of the devices (at least
        `policy.min_devices`) and sends `settings` unchanged. Override it to select by what
        devices announce (samples, arch, memory) or to change the training settings per round.

        Args:
            round_number: the round being opened.
            devices: the eligible online devices by ID, with the status each last published.
            settings: the configured round settings (training, privacy, codec).
            policy: the round policy (fraction, min_devices, ...).
            seed: the federation's seed.

        Returns:
            The plan; its devices must be keys of `devices`, at least one.
        """
        chosen = select_fraction(devices, round_number, policy.fraction, policy.min_devices, seed)
        return RoundPlan(chosen, settings)

    def params(self) -> dict[str, Any]:
        """Return the constructor parameters (JSON-able), for records and `make_strategy`."""
        return {}

    @abstractmethod
    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], deltas: Sequence[tuple[Weights, int]]
    ) -> Weights:
        """Combine a round's deltas into the new global weights.

        Args:
            global_weights: the weights the devices started the round from.
            deltas: (local weights - global weights, sample count) per accepted device.

        Returns:
            The new global weights.

        Raises:
            ValueError: no deltas, or keys or shapes that do not match the global weights.
        """

    def state_dict(self) -> dict[str, np.ndarray]:
        """Return the server-side state to persist between rounds (empty when stateless)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore state saved by `state_dict`.

        Raises:
            ValueError: the state is not empty (stateless strategies have nothing to restore).
        """
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017): add the sample-weighted mean delta."""

    name = "fedavg"
    weighted_sum = True

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], deltas: Sequence[tuple[Weights, int]]
    ) -> Weights:
        """Return global + weighted mean delta (see `Strategy.aggregate`)."""
        return _apply(global_weights, aggregate_weighted(deltas))


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg on the server; devices add (mu/2)||w - w_global||²."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        """Args: mu: the proximal coefficient devices use, >= 0.

        Raises:
            ValueError: mu is negative.
        """
        if not float(mu) >= 0.0:
            raise ValueError(f"fedprox mu must be >= 0, got {mu}")
        self.mu = float(mu)

    def configure_round(
        self,
        round_number: int,
        devices: Mapping[str, DeviceStatus],
        settings: RoundSettings,
        policy: RoundPolicy,
        seed: int,
    ) -> RoundPlan:
        """Select as FedAvg does and ask devices for the proximal term (`proximal_mu` = mu)."""
        plan = super().configure_round(round_number, devices, settings, policy, seed)
        train = dataclasses.replace(plan.settings.train, proximal_mu=self.mu)
        return RoundPlan(plan.selected, dataclasses.replace(plan.settings, train=train))

    def params(self) -> dict[str, Any]:
        """Return {"mu": mu}."""
        return {"mu": self.mu}


class FedAdam(Strategy):
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

    The pseudo-gradient is the sample-weighted mean delta Δ. Per coordinate:
    m ← β1·m + (1-β1)·Δ;  v ← β2·v + (1-β2)·Δ²;  x ← x + η·m / (√v + τ).
    As in the paper there is no bias correction, and v starts at τ².
    """

    name = "fedadam"
    weighted_sum = True

    def __init__(
        self, eta: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        """Args: eta: server learning rate (> 0); beta1, beta2: moment decays in [0, 1);
        tau: adaptivity (> 0).

        Raises:
            ValueError: a parameter is out of range.
        """
        if not float(eta) > 0.0:
            raise ValueError(f"{self.name} eta must be > 0, got {eta}")
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"{self.name} {label} must be in [0, 1), got {beta}")
        if not float(tau) > 0.0:
            raise ValueError(f"{self.name} tau must be > 0, got {tau}")
        self.eta, self.beta1, self.beta2 = float(eta), float(beta1), float(beta2)
        self.tau = float(tau)
        self.m: dict[str, np.ndarray] = {}  # float32, see aggregate
        self.v: dict[str, np.ndarray] = {}
        self.rounds = 0

    def params(self) -> dict[str, Any]:
        """Return the server optimizer's settings."""
        return {"eta": self.eta, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """Adam's second-moment update; FedYogi overrides it."""
        return self.beta2 * v + (1.0 - self.beta2) * squared

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], deltas: Sequence[tuple[Weights, int]]
    ) -> Weights:
        """Take one server-optimizer step along the mean delta (see `Strategy.aggregate`)."""
        pseudo_gradient = aggregate_weighted(deltas)
        check_updates([(dict(global_weights), 1), (pseudo_gradient, 1)])
        step: Weights = {}
        for key, value in pseudo_gradient.items():
            delta = np.asarray(value, dtype=np.float64)
            m = self.m.get(key, np.zeros(delta.shape, np.float32)).astype(np.float64)
            v = self.v.get(key, np.full(delta.shape, self.tau**2, np.float32)).astype(np.float64)
            if m.shape != delta.shape or v.shape != delta.shape:
                raise ValueError(
                    f"{self.name} state for {key!r} has shape {m.shape}, "
                    f"the delta has {delta.shape}"
                )
            # Moments are kept in float32 and the step is taken from the kept values, so state
            # saved as float32 safetensors (like a head) resumes bit for bit.
            self.m[key] = (self.beta1 * m + (1.0 - self.beta1) * delta).astype(np.float32)
            self.v[key] = self._second_moment(v, delta * delta).astype(np.float32)
            m, v = self.m[key].astype(np.float64), self.v[key].astype(np.float64)
            step[key] = self.eta * m / (np.sqrt(v) + self.tau)
        self.rounds += 1
        return _apply(global_weights, step)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Return the moments as {"m/KEY", "v/KEY"} float32 arrays plus "rounds".

        Float32 on purpose: the state can be stored with `edgefl.bundle.encode_head` unchanged.
        """
        state = {f"m/{key}": value.copy() for key, value in self.m.items()}
        state.update({f"v/{key}": value.copy() for key, value in self.v.items()})
        state["rounds"] = np.array(self.rounds, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore moments saved by `state_dict`.

        Raises:
            ValueError: a key is not "m/…", "v/…" or "rounds", or m and v do not pair up.
        """
        m: dict[str, np.ndarray] = {}
        v: dict[str, np.ndarray] = {}
        rounds = 0
        for name, value in state.items():
            if name == "rounds":
                rounds = int(np.asarray(value).item())
            elif name.startswith("m/"):
                m[name[2:]] = np.array(value, dtype=np.float32)
            elif name.startswith("v/"):
                v[name[2:]] = np.array(value, dtype=np.float32)
            else:
                raise ValueError(f"unexpected key {name!r} in {self.name} state")
        if set(m) != set(v) or any(m[k].shape != v[k].shape for k in m):
            raise ValueError(f"{self.name} state has unpaired first and second moments")
        self.m, self.v, self.rounds = m, v, rounds


class FedYogi(FedAdam):
    """FedYogi (Reddi et al. 2021): FedAdam with v ← v - (1-β2)·Δ²·sign(v - Δ²).

    Yogi's additive second-moment update grows v slowly when gradients shrink, which keeps the
    effective step from blowing up when devices disagree.
    """

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * squared * np.sign(v - squared)


class FedMedian(Strategy):
    """Coordinate-wise median of the deltas (Yin et al. 2018); robust to outlier devices."""

    name = "fedmedian"

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], deltas: Sequence[tuple[Weights, int]]
    ) -> Weights:
        """Return global + median delta (see `Strategy.aggregate`)."""
        return _apply(global_weights, aggregate_median(deltas))


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean of the deltas (Yin et al. 2018)."""

    name = "trimmed-mean"

    def __init__(self, trim_fraction: float = 0.1) -> None:
        """Args: trim_fraction: fraction dropped at each end, in [0, 0.5).

        Raises:
            ValueError: trim_fraction is out of range.
        """
        if not 0.0 <= float(trim_fraction) < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = float(trim_fraction)

    def params(self) -> dict[str, Any]:
        """Return {"trim_fraction": ...}."""
        return {"trim_fraction": self.trim_fraction}

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], deltas: Sequence[tuple[Weights, int]]
    ) -> Weights:
        """Return global + trimmed-mean delta (see `Strategy.aggregate`)."""
        return _apply(global_weights, aggregate_trimmed_mean(deltas, self.trim_fraction))


class Krum(Strategy):
    """(Multi-)Krum (Blanchard et al. 2017): keep the most central deltas, average them."""

    name = "krum"

    def __init__(self, num_byzantine: int = 0, multi: int = 1) -> None:
        """Args: num_byzantine: updates that may be arbitrary (>= 0); multi: updates kept (>= 1).

        Raises:
            ValueError: a parameter is out of range.
        """
        if int(num_byzantine) < 0:
            raise ValueError(f"krum num_byzantine must be >= 0, got {num_byzantine}")
        if int(multi) < 1:
            raise ValueError(f"krum multi must be >= 1, got {multi}")
        self.num_byzantine, self.multi = int(num_byzantine), int(multi)

    def params(self) -> dict[str, Any]:
        """Return {"num_byzantine": ..., "multi": ...}."""
        return {"num_byzantine": self.num_byzantine, "multi": self.multi}

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], deltas: Sequence[tuple[Weights, int]]
    ) -> Weights:
        """Return global + (multi-)Krum delta; `multi` is capped at the number of deltas."""
        multi = min(self.multi, len(deltas)) if deltas else self.multi
        return _apply(global_weights, krum(deltas, self.num_byzantine, multi))


_STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "trimmed-mean": TrimmedMean,
    "krum": Krum,
}
STRATEGY_NAMES: tuple[str, ...] = tuple(_STRATEGIES)


def strategy_params(name: str) -> tuple[str, ...]:
    """Return the parameter names a strategy accepts.

    Raises:
        ValueError: the name is unknown.
    """
    if name not in _STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGY_NAMES)}")
    return tuple(inspect.signature(_STRATEGIES[name]).parameters)


def make_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy by name.

    Args:
        name: one of `STRATEGY_NAMES`.
        **params: the strategy's parameters (e.g. mu=0.01 for "fedprox").

    Returns:
        The strategy.

    Raises:
        ValueError: unknown name or parameter (the message lists the valid ones), or a value
            out of range.
    """
    accepted = strategy_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise ValueError(
            f"strategy {name!r} has no parameter {', '.join(unknown)}; valid parameters: {valid}"
        )
    return _STRATEGIES[name](**params)


StrategySpec = str | Strategy | Callable[..., Strategy]


def check_strategy_spec(spec: StrategySpec, params: Mapping[str, Any]) -> None:
    """Check a strategy given as a name, an instance or a factory, without building it.

    Raises:
        ValueError: an unknown name or parameter, an instance given parameters, or something
            that is none of the three.
    """
    if isinstance(spec, str):
        make_strategy(spec, **params)
    elif isinstance(spec, Strategy):
        if params:
            raise ValueError("strategy parameters apply to a name or a factory, not an instance")
    elif not callable(spec):
        raise ValueError(f"a strategy is a name, a Strategy or a factory, not {spec!r}")


def build_strategies(
    spec: StrategySpec, params: Mapping[str, Any], tasks: Iterable[str]
) -> dict[str, Strategy]:
    """Build one strategy per task from a name, an instance or a factory.

    A stateful strategy keeps server state for one head, so tasks never share an instance:
    a name or a factory is called once per task (with `params`); an instance serves the first
    task itself and the others get deep copies of it.

    Args:
        spec: a name from `STRATEGY_NAMES`, a `Strategy`, or a callable returning one (a
            `Strategy` subclass, or a user's `mypkg.mod:factory`).
        params: keyword arguments for a name or a factory (must be empty for an instance).
        tasks: the task names, in order.

    Returns:
        The strategy of each task.

    Raises:
        ValueError: see `check_strategy_spec`, or a factory that does not return a Strategy.
    """
    check_strategy_spec(spec, params)
    strategies: dict[str, Strategy] = {}
    for index, task in enumerate(tasks):
        if isinstance(spec, str):
            strategy = make_strategy(spec, **params)
        elif isinstance(spec, Strategy):
            strategy = spec if index == 0 else copy.deepcopy(spec)
        else:
            strategy = spec(**params)
            if not isinstance(strategy, Strategy):
                raise ValueError(f"strategy factory {spec!r} returned {strategy!r}, not a Strategy")
        strategies[task] = strategy
    return strategies


def strategy_label(spec: StrategySpec) -> str:
    """Return a short name for records and logs: the name, or the strategy's class name."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Strategy):
        return spec.name or type(spec).__name__
    return getattr(spec, "__qualname__", repr(spec))

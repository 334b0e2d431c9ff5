"""Central differential privacy on the global prompts (`--dp server|client`), with accounting.

The clipping and the noise are Flower's message-based DP strategy wrappers
(`DifferentialPrivacyServerSideFixedClipping` / `...ClientSideFixedClipping`, the latter with
Flower's `fixedclipping_mod` on the clients): each client's update to the global prompts is
clipped to L2 norm C, the server averages the updates uniformly (DP-FedAvg: a num-examples weight
would let one client move the mean by more than C/k) and adds N(0, (σ·C/m)²) per coordinate, m
the sampled clients.

The ε comes from Flower's own RDP accountant (`flwr.supercore.privacy_accounting`, backed by
Google's dp-accounting), composed here rather than inside the wrapper: the wrapper's accounted
mode refuses a round where fewer than m clients answered, which our dropout handling makes
normal. A round that averages k ≤ m replies has sensitivity C/k under the same noise, so it is
composed as a Gaussian release with noise multiplier σ·k/m (no sampling amplification is
claimed; neighbouring = one client added or removed, population = all clients).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.app.message_type import MessageType
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                               SamplingMethod)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from training.config import TrainConfig

UNIFORM_WEIGHT = "dp-weight"  # the metric the DP aggregation weighs by (1 for every reply)


class PrivacyLedger:
    """ε spent so far at the configured δ, one Gaussian release per aggregated round."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.accountant = RdpAccountant(PrivacyConfig(target_delta=cfg.dp_delta, population_size=cfg.num_clients,
                                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                      sampling_method=SamplingMethod.NO_AMPLIFICATION))

    def release(self, replies: int, sampled: int) -> dict:
        """Compose one round that averaged `replies` updates under noise sized for `sampled`."""
        effective = self.cfg.dp_noise * replies / sampled
        self.accountant.compose(GaussianPrivacyEvent(noise_multiplier=effective, sample_size=replies,
                                                     population_size=self.cfg.num_clients))
        return self.spent(effective)

    def spent(self, effective: float | None = None) -> dict:
        spent = self.accountant.get_privacy_spent()
        row = {"epsilon": float(spent.epsilon), "delta": float(spent.delta), "releases": int(spent.num_releases),
               "mode": self.cfg.dp, "clip_norm": self.cfg.dp_clip_norm, "noise_multiplier": self.cfg.dp_noise}
        if effective is not None:
            row["round_noise_multiplier"] = effective
        return row


def dp_wrapper(cfg: TrainConfig, sampled: int, **fedavg) -> Strategy:
    """Flower's DP wrapper around a uniform-weight FedAvg with the run's sampling settings."""
    inner = FedAvg(weighted_by_key=UNIFORM_WEIGHT, **fedavg)
    kind = DifferentialPrivacyServerSideFixedClipping if cfg.dp == "server" else DifferentialPrivacyClientSideFixedClipping
    return kind(inner, noise_multiplier=cfg.dp_noise, clipping_norm=cfg.dp_clip_norm, num_sampled_clients=sampled)


def clipping_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixedclipping_mod, for train messages of a `--dp client` run only."""
    if msg.metadata.message_type == MessageType.TRAIN and "config" in msg.content.config_records \
            and KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)

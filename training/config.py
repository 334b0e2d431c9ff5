"""One configuration object for a federated run, and the methods it can train.

Several methods can train side by side in one Flower run: each method's global prompt is its
own key in the ArrayRecord, and FedAvg averages every key separately with the same
num-examples weights, which is exactly per-method FedAvg. Clients draw the same minibatches
for every method, so the methods are compared on paired data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from promptfolio.encoder import parse_pretrained
from promptfolio.portfolio import DEFAULT_THETA, THETA_GRID, check_theta
from promptfolio.prompts import ZERO_SHOT_PHRASE


@dataclass(frozen=True)
class Method:
    """name: zero-shot | local | promptfl | promptfolio | promptfolio-auto."""

    name: str
    theta: float | None  # fixed θ; None = chosen per client on its validation split

    @property
    def key(self) -> str:
        return self.name if self.name != "promptfolio" else f"promptfolio-{self.theta:g}"

    @property
    def trains_global(self) -> bool:
        return self.name in ("promptfl", "promptfolio", "promptfolio-auto")

    @property
    def trains_local(self) -> bool:
        return self.name in ("local", "promptfolio", "promptfolio-auto")


METHOD_NAMES = ("zero-shot", "local", "promptfl", "promptfolio", "promptfolio-auto")


def parse_method(text: str) -> Method:
    """'zero-shot', 'local', 'promptfl', 'promptfolio' (θ=0.4), 'promptfolio-0.6', 'promptfolio-auto'."""
    text = text.strip()
    if text == "zero-shot":
        return Method("zero-shot", 0.0)
    if text == "local":
        return Method("local", 1.0)
    if text == "promptfl":
        return Method("promptfl", 0.0)
    if text == "promptfolio-auto":
        return Method("promptfolio-auto", None)
    if text == "promptfolio":
        return Method("promptfolio", DEFAULT_THETA)
    if text.startswith("promptfolio-"):
        try:
            return Method("promptfolio", check_theta(text.removeprefix("promptfolio-")))
        except ValueError:
            pass
    raise ValueError(f"unknown method {text!r}; choose from {', '.join(METHOD_NAMES)} or promptfolio-<θ>")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # encoder
    arch: str = "embedded"
    pretrained: str | None = "embedded"
    # methods and federation
    methods: list[str] = Field(default_factory=lambda: ["promptfolio"])
    num_clients: int = Field(10, ge=1, le=1000)
    fraction_train: float = Field(1.0, gt=0, le=1)
    rounds: int = Field(10, ge=1, le=1000)
    # local optimisation; where a default departs from the official recipe, OFFICIAL_RECIPE has
    # the official value and README ("Defaults and the official recipe") the reason
    local_epochs: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    clip_norm: float | None = Field(1.0, gt=0)  # per-client gradient-norm clipping; None disables
    n_ctx: int = Field(4, ge=1, le=64)
    ctx_init: str | None = ZERO_SHOT_PHRASE  # phrase, or None (CLI: random) for N(0, 0.02)
    theta_grid: list[float] = Field(default_factory=lambda: list(THETA_GRID))
    # promptfolio-auto: how many validation images' worth of weight the federation's pooled θ curve
    # gets against a client's own (0: own curve only); README, per-client θ
    theta_prior_weight: float = Field(20.0, ge=0)
    # data (simulation)
    data: str = "embedded"  # "embedded" or an ImageFolder path
    images_per_class: int = Field(20, ge=1)  # embedded world only
    beta: float = Field(0.5, gt=0)  # Dirichlet concentration over labels
    # synthetic styles: each client its own / one shared / none; unset: "own" in the embedded
    # world, "none" for a user's folder (styles are applied to a user's images only when asked)
    shift: Literal["own", "shared", "none"] | None = None
    styles: list[str] = Field(default_factory=lambda: ["noise", "colour_cast", "blur", "clutter", "low_contrast"])
    shared_style: str = "blur"
    train_fraction: float = Field(0.4, gt=0, lt=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    min_images_per_client: int = Field(10, ge=3)
    general_per_class: int = Field(4, ge=1)  # balanced shared test set, per class
    skip_bad_images: bool = False  # leave unreadable images out (counted) instead of refusing the folder
    seed: int = 0
    classes: list[str] | None = None  # deployment: the federation's class list (simulation: from the data)
    # dropout, stragglers, secure aggregation, differential privacy (README "Training options")
    min_train_nodes: int = Field(1, ge=1)  # replies a training round needs to aggregate
    round_timeout: float = Field(600.0, gt=0)  # seconds the server waits for a round's replies
    short_round: Literal["skip", "retry"] = "skip"  # a round with too few replies: keep the last global, or ask again
    round_retries: int = Field(2, ge=0)  # short_round=retry: attempts before the run stops
    secure_aggregation: bool = False  # SecAgg+: the server sees only the sum of the clients' weighted prompts
    secagg_clip_range: float = Field(1.0, gt=0)  # prompt values (times n/max weight) clipped to ±this, then quantised
    secagg_quant_range: int = Field(2**22, ge=2**8, le=2**24)  # quantisation levels over [-clip, clip]
    secagg_max_weight: float = Field(1000.0, gt=0)  # largest num-examples a client may carry
    secagg_shares: float = Field(1.0, gt=0, le=1)  # share of the sampled clients each key is split among
    secagg_threshold: float = Field(0.5, gt=0, le=1)  # share of those shares that reconstructs a dropped key
    dp: Literal["off", "server", "client"] = "off"  # central DP, clipping the updates on the server or the clients
    dp_clip_norm: float = Field(0.1, gt=0)  # L2 bound of one client's update to the global prompts per round
    dp_noise: float = Field(1.0, gt=0)  # noise multiplier: Gaussian std = dp_noise * dp_clip_norm / sampled clients
    dp_delta: float = Field(1e-5, gt=0, lt=1)  # δ at which ε is reported
    test_fail_prob: float = Field(0.0, ge=0, lt=1)  # TEST ONLY: chance a client fails its training each round
    test_fail_seed: int = 0  # TEST ONLY: seed of those failures
    # output
    out_dir: Path = Path("runs/latest")
    resume: bool = False
    audit: bool = False  # keep every client's returned global prompts per round (audit/ folder)
    publish_store: Path | None = None  # also store the final global prompt in this prompts store
    publish_method: str | None = None  # which method's global to publish (default: the first with one)

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained(cls, v):
        return parse_pretrained(v)

    @field_validator("ctx_init", mode="before")
    @classmethod
    def _ctx_init(cls, v):
        """'random' / 'none' / '' (as the CLI and run config write it) mean N(0, 0.02)."""
        return None if v is None or str(v).strip().lower() in ("random", "none", "") else v

    @field_validator("methods", "styles", "classes", "theta_grid", mode="before")
    @classmethod
    def _split_strings(cls, v):
        """Flower's run config is flat: lists arrive as comma-separated strings."""
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one method")
        keys = [parse_method(m).key for m in v]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate methods: {v}")
        return v

    @field_validator("theta_grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        return [check_theta(t) for t in v]

    @field_validator("styles")
    @classmethod
    def _styles(cls, v: list[str]) -> list[str]:
        from promptfolio.embedded.world import STYLE_NAMES

        bad = [s for s in v if s not in STYLE_NAMES]
        if bad or not v:
            raise ValueError(f"unknown styles {bad}; choose from {', '.join(STYLE_NAMES)}")
        return v

    @property
    def style_shift(self) -> str:
        if self.shift is not None:
            return self.shift
        return "own" if self.data == "embedded" else "none"

    @property
    def method_specs(self) -> list[Method]:
        return [parse_method(m) for m in self.methods]

    @model_validator(mode="after")
    def _ctx_init_matches_n_ctx(self) -> "TrainConfig":
        if self.ctx_init is not None and "n_ctx" in self.model_fields_set and "ctx_init" not in self.model_fields_set:
            # an explicit n_ctx with the default phrase: the phrase cannot give that many tokens
            if self.n_ctx != len(self.ctx_init.split()):
                raise ValueError(f"--n-ctx {self.n_ctx} needs --ctx-init random (or a phrase of {self.n_ctx} "
                                 f"tokens); the default init {self.ctx_init!r} has {len(self.ctx_init.split())}")
        return self

    @model_validator(mode="after")
    def _privacy_options_combine(self) -> "TrainConfig":
        if self.dp != "off" and self.secure_aggregation:
            raise ValueError("--dp with --secure-aggregation is not supported: the DP wrapper needs the plain aggregate")
        if (self.dp != "off" or self.secure_aggregation) and not any(m.trains_global for m in self.method_specs):
            option = "--secure-aggregation" if self.secure_aggregation else f"--dp {self.dp}"
            raise ValueError(f"{option} needs a method with a global prompt (promptfl, promptfolio…)")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> "TrainConfig":
        """Flower's run config (`[tool.flwr.app.config]` plus `flwr run --run-config`): keys with '-'
        for '_', lists comma-separated, and "" for an unset value (TOML has no null)."""
        fields = {key.replace("-", "_"): value for key, value in run_config.items()}
        for name, field in cls.model_fields.items():
            if fields.get(name) == "" and type(None) in get_args(field.annotation):
                fields[name] = None
        if fields.get("ctx_init") == cls.model_fields["ctx_init"].default:
            del fields["ctx_init"]  # the default phrase, unless asked for: an explicit n-ctx gets a clear error
        if fields.get("clip_norm") == 0:  # as on the CLI: 0 disables clipping
            fields["clip_norm"] = None
        return cls.model_validate(fields)


def invalid_config_message(error: ValidationError) -> str:
    """One line naming every bad setting, for the CLI and the ServerApp's log."""
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'options'}: "
                         f"{err['msg'].removeprefix('Value error, ')}" for err in error.errors())
    return f"invalid training configuration: {problems}"


def run_config_value(value: object) -> str | int | float | bool:
    """One TrainConfig value as Flower's flat run config writes it."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    return value


def run_config_defaults() -> dict[str, str | int | float | bool]:
    """Every TrainConfig field as a run-config key with its default (what pyproject.toml's
    `[tool.flwr.app.config]` must hold: Flower refuses to override a key that is not listed)."""
    return {name.replace("_", "-"): run_config_value(field.get_default(call_default_factory=True))
            for name, field in TrainConfig.model_fields.items()}


# The official PromptFolio recipe where our defaults depart from it (README lists each reason).
# `promptfolio train --recipe official` applies these before any explicit flag.
OFFICIAL_RECIPE: dict[str, object] = {
    "n_ctx": 8,
    "ctx_init": None,  # N(0, 0.02)
    "lr": 0.002,
    "clip_norm": None,
    "beta": 0.3,
}

"""The wire format between the ServerApp and the ClientApps (both import this, never each other).

A message's ArrayRecord holds one key per method with a global prompt, `global/<method>`; a
client that trains no global prompt sends one placeholder array (FedAvg needs an array). A
client failure travels as Flower's error reason; `client_failure` writes the one line inside it
that the server reads back with `failure_of`.
"""

from __future__ import annotations

import re

import torch
from flwr.app import ArrayRecord

GLOBAL_PREFIX = "global/"
PLACEHOLDER_KEY = "placeholder"
_FAILURE = re.compile(r"promptfolio client (.+?) failed: ([^\n'\"]*)")


def pack_globals(prompts: dict[str, torch.Tensor]) -> ArrayRecord:
    """method key -> ctx `[n_ctx, width]`, as the ArrayRecord a message carries."""
    return ArrayRecord({GLOBAL_PREFIX + k: v.contiguous() for k, v in prompts.items()}
                       or {PLACEHOLDER_KEY: torch.zeros(1)})


def unpack_globals(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The global prompts in a message, by method key (the placeholder left out)."""
    return {k.removeprefix(GLOBAL_PREFIX): v for k, v in arrays.to_torch_state_dict().items()
            if k.startswith(GLOBAL_PREFIX)}


def allowed_keys(method_keys: list[str]) -> set[str]:
    """Every key a reply may carry: anything else (a local prompt) is refused by the server."""
    return {GLOBAL_PREFIX + k for k in method_keys} | {PLACEHOLDER_KEY}


def client_failure(client: int | str, error: BaseException) -> str:
    """One line naming the client (its partition in a simulation, else its site name) and the cause
    (Flower's own reason is a long Ray traceback)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return f"promptfolio client {client} failed: {type(error).__name__}: {text}"


def failure_of(reason: str) -> tuple[int | str | None, str]:
    """(client, cause) from a failed reply's error reason: the client as `client_failure` named it
    (a partition number, or a site name), None when unknown."""
    match = _FAILURE.search(reason)
    if match:
        client = match.group(1)
        return (int(client) if client.lstrip("-").isdigit() else client), match.group(2).strip()
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return None, (lines[-1] if lines else "unknown error")[:300]

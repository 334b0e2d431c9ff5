"""PromptFolio core: the method shared by training and the service (pure torch, no I/O layout).

The public API sits on top of every layer and is imported on first use, so importing the core
(`promptfolio.portfolio`, `promptfolio.prompts`, ...) never pulls in training or the store:

    from promptfolio import Classifier, personalize
    from promptfolio import Client, PromptFolioError     # the REST service's client (httpx)
"""

__version__ = "0.1.0"
__all__ = ["Classifier", "PersonalizeResult", "personalize", "Client", "PromptFolioError"]
_CLIENT_NAMES = ("Client", "PromptFolioError")


def __getattr__(name: str):
    if name in _CLIENT_NAMES:  # the client needs neither torch nor the store
        from promptfolio import client

        return getattr(client, name)
    if name in __all__:
        from promptfolio import api

        return getattr(api, name)
    raise AttributeError(f"module 'promptfolio' has no attribute {name!r}")

"""PromptFolio core: the method shared by training and the service (pure torch, no I/O layout).

The public API sits on top of every layer and is imported on first use, so importing the core
(`promptfolio.portfolio`, `promptfolio.prompts`, ...) never pulls in training or the store:

    from promptfolio import Classifier, personalize
"""

__version__ = "0.1.0"
__all__ = ["Classifier", "PersonalizeResult", "personalize"]


def __getattr__(name: str):
    if name in __all__:
        from promptfolio import api

        return getattr(api, name)
    raise AttributeError(f"module 'promptfolio' has no attribute {name!r}")

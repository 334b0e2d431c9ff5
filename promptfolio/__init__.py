"""PromptFolio core: the method shared by training and the service (pure torch, no I/O layout)."""

__version__ = "0.1.0"

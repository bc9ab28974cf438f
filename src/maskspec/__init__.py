"""maskspec: several tokens per forward pass from a Hugging Face causal LM, with identical output."""

__version__ = "0.1.0"

from maskspec.model.mtp import MTPConfig, MTPModel  # noqa: E402

__all__ = ["MTPConfig", "MTPModel", "__version__"]

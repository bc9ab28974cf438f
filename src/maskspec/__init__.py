"""maskspec: several tokens per forward pass from a Hugging Face causal LM, with identical output."""

from maskspec.model.mtp import MTPConfig, MTPModel
from maskspec.version import __version__

__all__ = ["MTPConfig", "MTPModel", "__version__"]

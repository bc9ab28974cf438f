from maskspec.model.layout import Layout, build_layout
from maskspec.model.mtp import MTPConfig, MTPModel

__all__ = ["Layout", "MTPConfig", "MTPModel", "build_layout"]

"""The version of this maskspec (kept equal to pyproject.toml's), with no imports: any module may read it."""

__version__ = "0.1.0"

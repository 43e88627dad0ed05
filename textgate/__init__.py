"""textgate core: plain typed Python, free of Prefect, DVC, BentoML and Great Expectations."""

__version__ = "0.1.0"

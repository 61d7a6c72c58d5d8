"""slimbench: compress LLMs with many methods at one parameter budget and compare them fairly."""

__version__ = "0.1.0"

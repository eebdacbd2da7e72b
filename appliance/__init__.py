"""The LLM appliance: a private, OpenAI-compatible endpoint for quantized open models."""

__version__ = "0.1.0"

"""loraplace: selective LoRA placement studies."""

__version__ = "0.1.0"

"""ratchet: continual fine-tuning of transformer text classifiers with gated promotion."""

__version__ = "0.1.0"

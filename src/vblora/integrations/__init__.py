"""Integrations with other libraries (transformers Trainer), imported only where used."""

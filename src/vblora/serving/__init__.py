"""Serving many adapters over one base model: the adapter store, the batcher, the HTTP server."""

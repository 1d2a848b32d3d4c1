"""Models: loading (backends, adapters, chat templates) and the built-in models."""

from reflectevo.models.loading import LoadedModel, load_model, load_tokenizer, select_backend

__all__ = ["LoadedModel", "load_model", "load_tokenizer", "select_backend"]

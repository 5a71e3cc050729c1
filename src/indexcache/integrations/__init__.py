"""IndexCache inside other libraries' models (transformers)."""

"""The documentation generator: one module per page (see ``scripts/make_docs.py``)."""

"""Integrations with other libraries, each in its own module and each importing its library
only when used (``import sparsedsl`` imports none of them).

* :mod:`sparsedsl.integrations.transformers`: a pattern as a Hugging Face ``transformers``
  attention implementation (``register(pattern)``, then ``attn_implementation=name``).
"""

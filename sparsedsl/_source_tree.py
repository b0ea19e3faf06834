"""Make ``sparsedsl.patterns`` importable from a source checkout.

The catalog lives in the repository's top-level ``patterns/`` folder and an installed
package ships it as ``sparsedsl.patterns`` (``pyproject.toml`` maps the folder). Run from a
checkout without installing (``PYTHONPATH=.``), the mapping does not exist, so the folder
beside the package is registered under that name here.
"""

from __future__ import annotations

import importlib.util
import os
import sys

NAME = "sparsedsl.patterns"


def register_source_patterns() -> None:
    """Register ``<checkout>/patterns`` as ``sparsedsl.patterns`` when no installed copy
    provides it."""
    if NAME in sys.modules or importlib.util.find_spec(NAME) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "patterns")
    init = os.path.join(folder, "__init__.py")
    if not os.path.exists(init):
        return
    spec = importlib.util.spec_from_file_location(NAME, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["sparsedsl"], "patterns", module)

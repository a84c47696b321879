"""Model families by name: `get_family("sd")` returns a fresh family object (no global registry state).

Which class implements a family, like every other fact about it, comes from the family table
(library/families/table.py). Each family lives in its own module and is imported only when asked
for, so `--help` of one script never imports another family's code.
"""

from __future__ import annotations


def get_family(name: str):
    """A new ModelFamily instance for `name` ("sd", ...)."""
    import importlib

    from library.families.table import family_facts

    module_name, class_name = family_facts(name).family_class.split(":")
    return getattr(importlib.import_module(module_name), class_name)()

"""Model families by name: `get_family("sd")` returns a fresh family object (no global registry state).

Each family lives in its own module and is imported only when asked for, so `--help` of one
script never imports another family's code.
"""

from __future__ import annotations

from library.errors import UserError, did_you_mean

# name -> (module, class); later families add their line here
FAMILY_CLASSES = {
    "sd": ("library.families.sd", "SDFamily"),
    "sdxl": ("library.families.sdxl", "SDXLFamily"),
    "flux": ("library.families.flux", "FluxFamily"),
    "sd3": ("library.families.sd3", "SD3Family"),
    "lumina": ("library.families.lumina", "LuminaFamily"),
}


def get_family(name: str):
    """A new ModelFamily instance for `name` ("sd", ...)."""
    import importlib

    if name not in FAMILY_CLASSES:
        raise UserError(f"unknown model family {name!r}{did_you_mean(name, FAMILY_CLASSES)}")
    module_name, class_name = FAMILY_CLASSES[name]
    return getattr(importlib.import_module(module_name), class_name)()

"""`lazy_import("torch")`: a module that is imported on first attribute access (as Polygraphy's
`mod.lazy_import`), so a module can name a heavy optional dependency at its top and still import
in an environment without it."""

from __future__ import annotations

import importlib
import types


class _LazyModule(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_module"] = None

    def __getattr__(self, attribute: str):
        module = self.__dict__["_module"]
        if module is None:
            module = importlib.import_module(self.__name__)
            self.__dict__["_module"] = module
        return getattr(module, attribute)


def lazy_import(name: str) -> types.ModuleType:
    return _LazyModule(name)

"""Lazy package attributes (PEP 562): a package names what it exports and where, and each module
is imported on first access, so ``import fusion_engine.<package>.command`` (the command line) does
not pay for torch and the package's heavy modules."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Callable


class _LazyPackage(types.ModuleType):
    """A package whose export ``name`` lives in its submodule ``.name`` (``data_aware.adamerging``, the
    function, in ``data_aware/adamerging.py``): importing that submodule would rebind the package's
    attribute to the module, as the import system does; the export is kept instead."""

    _lazy_exports: dict[str, str]

    def __setattr__(self, name: str, value: object) -> None:
        if (isinstance(value, types.ModuleType) and self._lazy_exports.get(name) == f".{name}"
                and value.__name__ == f"{self.__name__}.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``; ``exports`` maps a public name to its module
    (relative, e.g. ``".cka"``), or to ``""`` for a submodule of that name."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module._lazy_exports = exports

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        source = exports[name]
        value = (importlib.import_module(f".{name}", package) if not source
                 else getattr(importlib.import_module(source, package), name))
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(exports))

    return __getattr__, __dir__

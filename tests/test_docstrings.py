"""The examples in the public API's docstrings run and print what they say."""

import builtins
import doctest
import importlib
import pkgutil

import pytest

import qwennb

MODULES = sorted(m.name for m in pkgutil.iter_modules(qwennb.__path__, "qwennb."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    # doctest echoes results through sys.displayhook, which sets builtins._; IPython then stops updating its
    # own `_` (tests of the magics run later in the same process), so put it back as it was.
    had, old = hasattr(builtins, "_"), getattr(builtins, "_", None)
    try:
        flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        result = doctest.testmod(module, optionflags=flags, verbose=False)
    finally:
        if had:
            builtins._ = old
        elif hasattr(builtins, "_"):
            del builtins._
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"

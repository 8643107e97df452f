"""The ``brainprop`` command's entry point.

It lives outside the package because importing ``brainprop`` imports torch, a second or two in
which a Ctrl-C (a mistyped command stopped at once) would otherwise end in a traceback out of
the import machinery; here it ends as a Ctrl-C later does (:func:`brainprop.cli.main`).
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from brainprop.cli import main as command
    except KeyboardInterrupt:
        print("brainprop: interrupted", file=sys.stderr)
        return 130
    return command()

"""Test-suite set-up shared by every test directory.

The helpers live in the `support` package (tests/support/), imported as
``from support.daemons import ...``: this file puts tests/ on sys.path first, whatever
pytest's import mode, so that a helper module is never taken for a test module and no
test imports another by a top-level name. Fixtures that more than one directory needs
belong here too; tests/deploy/conftest.py holds those of the deploy/ tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

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

# The aged-guest cache (pool.aged_cache) lives in $XDG_CACHE_HOME: for the whole session (and
# every command a test starts, which inherits the environment) that is a fresh temporary
# directory, so tests never read or write the user's ~/.cache.
import atexit  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_CACHE_HOME = tempfile.mkdtemp(prefix="sharedpool-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, True)

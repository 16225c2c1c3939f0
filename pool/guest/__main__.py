"""`python -m pool.guest`: see pool.guest.cli."""

from pool.guest.cli import main

raise SystemExit(main())

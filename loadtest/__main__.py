from __future__ import annotations

from loadtest.cli import main

# Guarded: --procs spawns children that re-import this module as __mp_main__.
if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m server.observability.tracing`: the trace export process (see `export.main`)."""

import sys

from server.observability.tracing.export import main

if __name__ == "__main__":
    sys.exit(main())

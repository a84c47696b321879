"""Web UI: prepare a dataset, start, watch, stop and resume training runs (see docs/ui.md).

Usage: python ui.py [--host 127.0.0.1] [--port 7860] [--auth user:password] [--workspace ui_workspace]
"""

import sys

from library.errors import USER_ERROR_EXIT_CODE, UserError

if __name__ == "__main__":
    from library.ui.app import main

    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)

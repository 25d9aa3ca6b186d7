"""``python -m daemon`` is the ``smspartner-status`` command."""

import sys

from daemon.cli import main

sys.exit(main())

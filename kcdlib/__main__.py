"""``python -m kcdlib`` is the ``kcd`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m fastfork ...`` is the ``fastfork`` command."""
import sys

from fastfork.cli import main

sys.exit(main())

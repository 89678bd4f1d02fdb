"""``python -m perceiver_fast bench|train``: the same as the ``perceiver-fast`` command."""
import sys

from perceiver_fast.cli import main

sys.exit(main())

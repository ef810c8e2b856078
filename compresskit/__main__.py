"""``python -m compresskit`` = the ``compresskit`` command."""
import sys

from .cli import main

sys.exit(main())

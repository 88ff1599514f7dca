"""``python -m lorakit.cli``: the ``lorakit`` command."""

import sys

from . import main

sys.exit(main())

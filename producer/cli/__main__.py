"""``python -m producer.cli``: the `belle-queue` command."""

import sys

from producer.cli import main

sys.exit(main())

"""``python -m finetune_local``: the same as the ``finetune-local`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m einflash``: the command line."""

from .cli import main

raise SystemExit(main())

"""Run the cowtree command line: python -m cowtree."""

from .cli import main

raise SystemExit(main())

"""``python -m meshai`` runs the command line."""

from meshai.cli import main

raise SystemExit(main())

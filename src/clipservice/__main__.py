"""``python -m clipservice`` runs the command line."""

from clipservice.cli import main

raise SystemExit(main())

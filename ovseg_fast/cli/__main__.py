"""``python -m ovseg_fast.cli`` is the ``ovseg-fast`` command."""

from ovseg_fast.cli import main

raise SystemExit(main())

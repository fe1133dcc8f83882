"""``python -m crossent``: the ``crossent`` command (:func:`crossent.cli.main`)."""

from crossent.cli import main

raise SystemExit(main())

"""``python -m mixedprec ...``: the same command line as the ``mixedprec`` script."""
from mixedprec.cli import main

raise SystemExit(main())

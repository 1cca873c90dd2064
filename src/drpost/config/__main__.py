"""``python -m drpost.config [PATH] [--check]``: write (or check) docs/configuration.md."""

from drpost.config.render import main

raise SystemExit(main())

"""``python -m drpost.bench.system ARGS``: the same as ``drpost bench system ARGS``."""

from drpost.bench.system.measure import main

raise SystemExit(main())

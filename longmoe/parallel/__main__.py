"""``python -m longmoe.parallel``: what the cost model predicts for a cluster described by its hardware
(see :mod:`longmoe.parallel.planning`)."""

from longmoe.parallel.planning import main

raise SystemExit(main())

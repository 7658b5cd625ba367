"""``python -m hfvolume ...`` (and ``accelerate launch -m hfvolume estimate ...``): the ``hfvolume`` command."""
from hfvolume.integrations.cli import main

raise SystemExit(main())

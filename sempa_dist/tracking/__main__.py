"""``python -m sempa_dist.tracking ...``: the name this command had before it moved to
`sempa_dist.cli.tracking` (``sempa-tracking``); kept so notes printed by earlier runs and scripts
that use it still work."""

import sys

from sempa_dist.cli.tracking import main

sys.exit(main())

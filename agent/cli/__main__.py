"""`python -m agent.cli`, the same as `shardmesh` (tests and the demo start agents this way)."""

import sys

from agent.cli.main import main

sys.exit(main())

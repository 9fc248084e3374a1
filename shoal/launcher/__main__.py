"""`python -m shoal.launcher ...` is `fleetrun ...`."""
import sys

from shoal.launcher.cli import main

sys.exit(main())

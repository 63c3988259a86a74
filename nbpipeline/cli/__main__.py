"""`python -m nbpipeline.cli`: the same as the `nbpipeline` command."""

import sys

from nbpipeline.cli import main

sys.exit(main())

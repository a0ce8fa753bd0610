"""`python -m medtransfer` = the `medtransfer` command."""

import sys

from medtransfer.cli import main

sys.exit(main())

"""`python -m deepmlf_fast` is the `deepmlf` command."""

import sys

from deepmlf_fast.cli import main

sys.exit(main())

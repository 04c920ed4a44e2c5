"""`python -m plugtune ...`, the same as the `plugtune` command (torchrun runs it as `-m plugtune`)."""
import sys

from plugtune.cli import main

sys.exit(main())

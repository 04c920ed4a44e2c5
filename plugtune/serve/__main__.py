"""python -m plugtune.serve --model M --adapter NAME=DIR ...: the same as `plugtune serve`."""
import sys

from plugtune.serve.cli import main

sys.exit(main())

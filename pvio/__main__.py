import sys

from pvio.cli import main

sys.exit(main())

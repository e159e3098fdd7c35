import sys

from fovea.cli import main

sys.exit(main())

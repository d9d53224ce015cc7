import sys

from vringipc.cli import main

sys.exit(main())

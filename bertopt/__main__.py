import sys

from bertopt.cli import main

sys.exit(main())

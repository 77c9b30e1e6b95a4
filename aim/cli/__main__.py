import sys

from aim.cli import main

sys.exit(main())

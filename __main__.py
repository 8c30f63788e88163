import sys

from nestnas.cli import main

sys.exit(main())

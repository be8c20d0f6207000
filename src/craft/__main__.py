import sys

from craft.cli import main

sys.exit(main())

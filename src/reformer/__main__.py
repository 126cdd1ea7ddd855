import sys

from reformer.cli import main

sys.exit(main())

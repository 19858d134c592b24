import sys

from nmgen.cli import main

sys.exit(main())

import sys

from circuitq.cli import main

sys.exit(main())

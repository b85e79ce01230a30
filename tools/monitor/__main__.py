import sys

from tools.monitor import main

sys.exit(main())

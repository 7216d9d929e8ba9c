"""python -m orchestrator_service.cli"""

import sys

from orchestrator_service.cli import main

sys.exit(main())

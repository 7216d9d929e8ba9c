"""python -m orchestrator_service"""

from orchestrator_service.config import Settings
from orchestrator_service.server import serve
from tierwriter.settings import load_or_exit

serve(load_or_exit(Settings))

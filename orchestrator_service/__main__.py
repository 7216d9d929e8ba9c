"""python -m orchestrator_service"""

from orchestrator_service.config import Settings
from orchestrator_service.server import serve

serve(Settings())

"""python -m generator_service"""

from generator_service.config import Settings
from generator_service.server import serve

serve(Settings())

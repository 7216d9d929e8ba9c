"""python -m generator_service"""

from generator_service.config import Settings
from generator_service.server import serve
from tierwriter.settings import load_or_exit

serve(load_or_exit(Settings))

"""python -m persistence_service"""

from persistence_service.config import Settings
from persistence_service.server import serve
from tierwriter.settings import load_or_exit

serve(load_or_exit(Settings))

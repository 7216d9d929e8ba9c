"""python -m persistence_service"""

from persistence_service.config import Settings
from persistence_service.server import serve

serve(Settings())

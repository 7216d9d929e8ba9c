"""persistence_service: owns every database session; one unit of work per RPC."""

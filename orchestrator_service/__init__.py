"""orchestrator_service: the public API; runs job files across the generator and persistence."""

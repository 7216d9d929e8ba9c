"""generator_service: turns article requests into stored articles via an OpenAI-compatible API."""

"""tierwriter: generated gRPC code (tierwriter.<service>.v1) and the runtime the services share."""

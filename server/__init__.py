"""pagefusion's gRPC server: thin servicers over the engine."""

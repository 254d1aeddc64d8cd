"""gRPC transport: servicers, proto <-> domain conversion, and the error -> status map."""

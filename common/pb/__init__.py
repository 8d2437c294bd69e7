"""Generated protobuf and gRPC code for fedstream.v1 (do not edit; run `make proto`)."""

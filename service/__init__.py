"""paramserve's gRPC edge: the server and its servicers, tensor codec, batching, placement,
the Python client and the CLI. Servicers stay thin: decode, call a core object, encode."""

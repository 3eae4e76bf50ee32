"""paramserve's gRPC edge (server, servicers, client, CLI). Not built yet: see issue `service`."""

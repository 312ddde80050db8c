"""Generated gRPC stubs of the fedtune wire contract (see protos/fedtune/v1/)."""

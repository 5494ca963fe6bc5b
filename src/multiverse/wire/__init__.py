"""The gRPC contracts' generated code and the conversions between it and core types."""

"""The shared gRPC kit: server factory, interceptors, error mapping, health, typed clients."""

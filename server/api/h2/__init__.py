"""gRPC over HTTP/2 on the event loop itself, without gRPC core: `[server] grpc_transport =
"native"` (server/api/server.py builds it). frames.py is the wire, connection.py one client
connection, calls.py one call, server.py the listener and life cycle."""

"""The data plane: the one interface the transports call (plane.DataPlane), and what the server
says about itself and its models in the protocol's JSON shapes (describe)."""

from server.dataplane.plane import DataPlane

__all__ = ["DataPlane"]

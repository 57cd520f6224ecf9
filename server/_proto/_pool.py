"""The descriptor pool batchline's generated protobuf modules register into (see proto/generate.py)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()

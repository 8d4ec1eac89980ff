"""The descriptor pool of this package's generated modules (see generate.py: why not the default)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()

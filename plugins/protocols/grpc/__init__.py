"""V2 (the Open Inference Protocol) over gRPC: ``inference.GRPCInferenceService``.

- ``servicer.py``: ``add_v2_servicer(server, context)``, the seam the listener calls (importing
  it needs no grpc);
- ``service.py``: the RPCs on the server's ``ServingContext`` (token, counting, deadlines);
- ``tensors.py``: request tensors (raw and typed) to the model's values and back;
- ``status.py``: our errors as gRPC status codes;
- ``listener.py``: the ``grpc.aio`` server in each serving process (``--grpc-port``);
- ``*.proto`` (Triton's) and the ``*_pb2*.py`` generated from them by ``generate.py``.
"""

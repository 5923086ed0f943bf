"""The router's KServe v2 / Open Inference Protocol front doors (the protocol Triton and its clients speak).

``core`` is transport-neutral: validation, the fan-out of a request's images through the router's
``Forwarder``, the answer's tensors, and the model and server descriptions. ``grpc_api`` serves it
as ``inference.GRPCInferenceService`` (ModelStreamInfer included); ``http`` serves it over REST.
"""

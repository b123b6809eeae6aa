"""Security layers: CURVE links and ZAP, JWT tokens, the access policy, payload encryption, signatures.

Each module holds one layer as plain objects that return decisions (`(allowed, reason)`
or a `MeshError` to raise); the broker, node and client loops call them. Library
errors (`jwt.*`, `nacl.exceptions.*`, cryptography's `InvalidTag`, `zmq.ZMQError`) never
leave the module that calls the library.
"""

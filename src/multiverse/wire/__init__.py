"""The wire: the gRPC contracts' generated code, conversions to and from core types, and the
transport's TLS identities (the cluster CA and what it signs, in pki.py)."""

"""Test harness: real servers (S3, Kubernetes API) and stand-ins for what this machine lacks (a kubelet)."""

"""The FusionRun Kubernetes operator (kopf). Imports no torch."""

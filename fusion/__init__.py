"""FuseLLM algorithms: token/vocabulary alignment, extraction, fusion, loss, training. No Kubernetes, no S3."""

__version__ = "0.1.0"

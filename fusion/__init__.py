"""FuseLLM algorithms: token/vocabulary alignment, extraction, fusion, loss, training. No Kubernetes."""

__version__ = "0.1.0"

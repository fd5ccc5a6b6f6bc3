"""The model and how it executes: backbones, the fused CSAD module, bundles and runtimes.

``engines`` imports neither ``stream`` nor ``offline``: a GPU worker loads a bundle and runs it
without pulling in any training code.
"""

from lineguard.engines.errors import LineguardError

__all__ = ["LineguardError"]

"""The chaos tests' TCP proxy lives in the package now, where the drill uses it too."""

from gridqueue.chaosproxy import TcpProxy

__all__ = ["TcpProxy"]

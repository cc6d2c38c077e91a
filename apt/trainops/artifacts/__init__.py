from .manager import ArtifactManager

__all__ = ["ArtifactManager"]

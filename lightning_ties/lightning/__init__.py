"""Lightning integration: the only subpackage that imports lightning."""

__all__: list[str] = []

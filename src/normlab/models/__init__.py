"""Model builders parametrised by a normalization name (see :func:`normlab.create_norm`)."""

__all__: list[str] = []

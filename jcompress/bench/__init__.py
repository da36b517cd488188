"""Benchmarks: ``python -m jcompress.bench`` runs the ``b*.py`` modules (see ``__main__``).

Every figure is timed with :mod:`jcompress.timing` (medians of interleaved calls, the
first, compiling call reported apart).
"""

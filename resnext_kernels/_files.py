"""Writing files that readers may open at any moment (the auto cache, the bench CLI's
rows as they come)."""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def replacing(path: str, **open_kwargs):
    """A text file whose contents replace ``path`` atomically when the block ends: a
    temporary file beside it, then ``os.replace``. ``path`` is untouched if the block
    raises."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

"""One way to replace a file so that readers (and a kill or a full disk) never see half of it: `write_atomic`."""

from __future__ import annotations

import os
import tempfile


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes `data` (text as UTF-8, or bytes) to `path` through a temporary file in the same folder, fsync'd, then
  `os.replace`d onto `path`: `path` holds the previous content or the new one, never a part.

  The file gets mode 0o644 (``mkstemp`` creates 0o600). On any error, including KeyboardInterrupt, the temporary
  file is removed and `path` is left as it was.
  """
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
